"""The pipeline: one TOML file describes an experiment (``file``: read without torch, at Dagster load), its stages
run it (``stages``: train, visuals, report), and a watched folder takes SAE files users drop (``watch``). The top
of saev_core's layers below the CLI and the explorer."""
