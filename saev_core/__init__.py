"""saev_core: record ViT activations into a zarr store and train sparse autoencoders on them (no Dagster needed).

Public names follow the original saev package: saev_core.activations (make_vit, make_img_transform,
RecordedVisionTransformer), saev_core.nn (load, dump, the SAE variants). Importing this package imports no torch.
"""
