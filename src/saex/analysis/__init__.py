"""Feature analyses: top examples, label entropy, density clusters, neuron alignment."""
