"""The activation store (zarr v3): its typed metadata and key, the plain-shard byte format, token modes,
normalisation statistics and the shuffled loader. The lowest layer above the base (``errors``, ``files``,
``config``); it imports nothing else of ours.

``saev_core.store.ActivationStore`` and ``saev_core.store.write_store`` are the documented entry points."""

from saev_core.store.activation_store import ActivationStore, layer_name, open_if_created
from saev_core.store.from_arrays import arrays_metadata, write_store

__all__ = ["ActivationStore", "arrays_metadata", "layer_name", "open_if_created", "write_store"]
