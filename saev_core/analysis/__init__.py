"""Analysis: latents of new images (inference), splice-in fidelity, the sweep report and its plots. Imports the
layers below only."""
