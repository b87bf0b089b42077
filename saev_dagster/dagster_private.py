"""Everything saev_dagster takes from Dagster's private modules (``dagster._*``), in one place: a Dagster upgrade
that moves one breaks this import and nothing else. Each was looked for in dagster 1.13's public API (the names
``import dagster`` exports, and the API docs) and is not there.

Not here on purpose: Dagster's private ``observe`` (an in-process observation run). It is an asset job over the
sources executed in process, all public API, so ``assets.sources.observe_sources`` does that instead.
"""

# The tag under which an observation carries its data version ("dagster/data_version"). An observation run writes it
# from ObserveResult.data_version; the recording op also logs, as dg.AssetObservation events, observations of the
# sources it read, and they must carry the same tag for the recording's input data versions to be theirs. Public and
# missing: dg.AssetObservation takes no data_version, and no constant for the tag is exported. Imported rather than
# spelt out so a renamed tag fails here, not silently.
# Checks a value against a config schema and says which key is wrong, without building a job: how the k8s executor
# config is checked when the code location loads instead of when the first run starts. Public and missing: an
# executor's ``configured(...)`` is checked only at launch; dg.validate_run_config needs a whole job; neither
# ExecutorDefinition.config_schema nor its resolve_config is marked public.
from dagster._config import process_config
from dagster._core.definitions.data_version import DATA_VERSION_TAG

__all__ = ["DATA_VERSION_TAG", "process_config"]
