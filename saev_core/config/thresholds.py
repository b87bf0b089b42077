"""Thresholds of the verdicts that several layers share (the metrics, the report, the explorer, the pipeline's
[checks]), defined once."""

DENSE_FREQ = 1e-2
"""A latent that fires on more than this fraction of vectors is dense (``nn.metrics``' ``n_dense``, the report's
verdict, the explorer's class-selectivity order)."""

MIN_GAIN_VS_RANDOM = 0.25
"""How much less held-out error than the random-decoder control at the same L0 counts as structure found ([checks]
min_gain_vs_random). Trained SAEs beat random atoms by up to 13 % on isotropic Gaussian noise and by 40-89 % on planted
atoms (benchmarks/bench_planted.py, --null; docs/benchmarks.md)."""
