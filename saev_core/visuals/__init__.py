"""Visuals: the streaming top-k pass over a store layer, heatmaps through the ViT's resize and crop, the static
gallery, latent-class association, and the job that renders an SAE's visuals. Imports the layers below only."""
