"""Training: sweeps (a TOML grid, groups that share one data pass), fitting a run's defaults to its length and
machine, the one-pass training loop, resume state. Imports ``nn``, ``record``, ``store`` and the base."""
