"""Dagster assets, checks, sensors and schedules over saev_core. Thin: assets read config, call saev_core, report."""

import warnings

import dagster as dg

# Observable sources, single-run backfills and include_sources are marked beta in Dagster 1.13; we rely on them.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
# Partitioned asset checks (topk_visuals) are marked preview.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
