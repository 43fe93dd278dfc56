"""saex: train, evaluate and explore sparse autoencoders on vision and language transformers."""

__version__ = "0.1.0"
