"""The feature index's SQLite schema: what `saex index` writes and the explorer reads."""

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);          -- JSON values
CREATE TABLE features (
    id INTEGER PRIMARY KEY,
    density REAL NOT NULL,          -- fraction of tokens it fires on
    mean_act REAL,                  -- mean activation when firing
    max_act REAL,
    mean_top20 REAL,                -- mean activation over its top 20 examples (seed 002's y axis)
    label_entropy REAL,             -- bits, of its top-20 label distribution weighted by activation
    top_label INTEGER,
    enc_dec_cos REAL,               -- cosine of its encoder and decoder vectors
    neuron_max_cos REAL,            -- max cosine of its encoder vector with an MLP-out vector
    neuron INTEGER,                 -- that neuron
    neurons_above INTEGER,          -- neurons above the random baseline's range
    dense_cluster INTEGER NOT NULL  -- 1: in the ultra-low-density cluster
);
CREATE TABLE feature_examples (
    feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,   -- kind: top | sample
    example INTEGER NOT NULL, value REAL NOT NULL,
    tokens TEXT,                    -- text: JSON [[token, activation], ...] around the strongest token
    PRIMARY KEY (feature, kind, rank)
);
CREATE TABLE feature_labels (feature INTEGER NOT NULL, label INTEGER NOT NULL, weight REAL NOT NULL,
                             PRIMARY KEY (feature, label));
CREATE TABLE examples (example INTEGER PRIMARY KEY, id TEXT NOT NULL, label INTEGER NOT NULL,
                       text TEXT, thumb TEXT,
                       first_row INTEGER NOT NULL, n_rows INTEGER NOT NULL);  -- its rows in the store
CREATE TABLE example_features (example INTEGER NOT NULL, rank INTEGER NOT NULL, feature INTEGER NOT NULL,
                               value REAL NOT NULL, PRIMARY KEY (example, rank));
-- each feature zeroed on its top `examples` (analysis/ablation.py); empty with --no-ablation
CREATE TABLE ablation (feature INTEGER PRIMARY KEY, examples INTEGER,
                       kl REAL,          -- mean KL(clean || ablated) of the readout, nats (NULL: embeddings)
                       loss_delta REAL,  -- mean increase of the loss: true label's CE, next-token loss, 1 - cos
                       loses TEXT, loses_delta REAL,    -- the output whose probability drops most, mean change
                       gains TEXT, gains_delta REAL);   -- ... and rises most (NULL when none does)
CREATE TABLE ablation_outputs (feature INTEGER, name TEXT, delta REAL);  -- mean change of each output's
                                -- probability (every class or prompt; a vocabulary's 10 drops and 10 rises)
CREATE INDEX feature_examples_by_example ON feature_examples (example);
CREATE INDEX features_by_density ON features (density);
CREATE INDEX features_by_label ON features (top_label);
CREATE INDEX ablation_outputs_by_feature ON ablation_outputs (feature);
-- the feature lens (analysis/lens.py): decoder and encoder vectors read through the model's readout; empty with
-- --no-lens or without a model (toy stores)
CREATE TABLE lens (feature INTEGER NOT NULL, vector TEXT NOT NULL,   -- vector: dec | enc
                   rank INTEGER NOT NULL,    -- 0, 1, ...: promoted most first; -1, -2, ...: suppressed most first
                   output INTEGER NOT NULL,  -- token id, class or label prompt (lens_outputs)
                   weight REAL NOT NULL,     -- logit (unembedding, classifier) or cosine (input embeddings, prompts)
                   PRIMARY KEY (feature, vector, rank)) WITHOUT ROWID;
CREATE TABLE lens_outputs (output INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE lens_stats (feature INTEGER PRIMARY KEY,
                         skew REAL, kurtosis REAL,  -- of the decoder's weights over all outputs (Fisher kurtosis)
                         lens_class TEXT,           -- prediction | suppression | partition | none (analysis/taxonomy.py)
                         weights_cos REAL,          -- cosine of the decoder's and the encoder's weights
                         hist_lo REAL, hist_hi REAL, hist TEXT);  -- the decoder's weights: JSON counts, equal bins
CREATE INDEX lens_stats_by_class ON lens_stats (lens_class);
"""
