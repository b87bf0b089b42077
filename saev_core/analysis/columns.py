"""The columns of a sweep's table that more than one view shows (the report's table, the explorer's members table),
named once. Imports nothing heavy: the explorer reads it at start-up."""

from collections.abc import Container, Iterable

GAINS = {"pca_nmse_at_l0": "gain_vs_pca", "random_nmse_at_l0": "gain_vs_random", "kmeans_nmse": "gain_vs_kmeans"}
"""Control column -> the column saying by how much the SAE beats it (``analysis.controls`` adds both)."""
CONTROL_COLUMNS = (*GAINS, *GAINS.values())
"""The controls' NMSE columns, then their gains."""


def present(table: Container[str], columns: Iterable[str]) -> list[str]:
    """The names in ``columns`` that ``table`` (a DataFrame, or any container of column names) has, in ``columns``'
    order: a sweep's table has the controls' columns only once the pipeline added them."""
    return [c for c in columns if c in table]
