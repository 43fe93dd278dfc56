"""The activation store: half-precision safetensors shards plus a manifest; knows tensors and files only."""

from saex.store.manifest import FORMAT, MANIFEST, acts_column, load_manifest
from saex.store.reader import ActivationStore
from saex.store.writer import StoreMismatch, StoreWriter

__all__ = ["FORMAT", "MANIFEST", "ActivationStore", "StoreMismatch", "StoreWriter", "acts_column",
           "load_manifest"]
