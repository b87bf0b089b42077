"""Recording: image sources and the embedded sets, ViT families and the recorder, checkpoint strings, the
resumable recording loop and verification against the ViT. Imports the store layer and the base only.

``saev_core.activations`` keeps the names saev's users know (``make_vit``, ``make_img_transform``,
``RecordedVisionTransformer``)."""
