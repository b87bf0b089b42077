"""Recording ViT activations: the public names of the original saev package.

The ViT families and the recorder live in ``saev_core.record.vit``, the recording loop in
``saev_core.record.recording``, the store in ``saev_core.store``; they are exposed here under the names saev's users
know.
"""

from saev_core.record.recording import record_activations
from saev_core.record.vit import RecordedVisionTransformer, make_img_transform, make_vit
from saev_core.store import ActivationStore

__all__ = ["make_vit", "make_img_transform", "RecordedVisionTransformer", "record_activations", "ActivationStore"]
