"""Dagster metadata helpers: inline PNGs (Dagster has no image metadata type), lineage through metadata, tables,
numbers the Plots tab can chart."""

import base64
import math

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def latest_materialization_value(context, asset: str, partition: str | None, key: str):
    """A metadata value of the latest materialization of asset[partition]: how an asset finds what the one
    upstream of it wrote (lineage through metadata)."""
    value = _latest_value(context, asset, partition, key)
    if value is None:
        where = f"{asset}[{partition}]" if partition else asset
        raise dg.Failure(description=f"{where} has never been materialized; materialize it first.")
    return value


def latest_values(context, asset: str, partitions: list[str], key: str) -> dict[str, object]:
    """{partition: metadata value} of the latest materialization of each partition that has one."""
    values = {p: _latest_value(context, asset, p, key) for p in partitions}
    return {p: v for p, v in values.items() if v is not None}


def _latest_value(context, asset: str, partition: str | None, key: str):
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    )
    return result.records[0].asset_materialization.metadata[key].value if result.records else None


def latest_store_path(context, partition: str) -> str:
    """The store that the latest materialization of activations[partition] wrote."""
    return latest_materialization_value(context, "activations", partition, "store_path")


def previous_materialization(context, asset: str, partition: str, store_path: str) -> dict | None:
    """The metadata values of the latest earlier materialization of asset[partition] that wrote ``store_path``."""
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=20
    )
    for record in result.records:
        meta = record.asset_materialization.metadata
        if "store_path" in meta and meta["store_path"].value == store_path and "imgs_per_s" in meta:
            return {k: v.value for k, v in meta.items()}
    return None


def table(rows: list[dict], columns: list[tuple[str, str]]) -> dg.TableMetadataValue:
    """rows as a Dagster table with a schema; columns: (name, type) with type one of string, int, float, bool.
    Missing and NaN cells are left empty (None: Dagster wants every record to have every column)."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns])
    cast = {"string": str, "int": int, "float": lambda v: float(f"{float(v):.4g}"), "bool": bool}  # 4 digits read

    def present(value) -> bool:
        return value is not None and not (isinstance(value, float) and value != value)

    records = [
        dg.TableRecord({name: cast[kind](row[name]) if present(row.get(name)) else None for name, kind in columns})
        for row in rows
    ]
    return dg.MetadataValue.table(records, schema=schema)


def rounded(value, digits: int = 4) -> dg.MetadataValue | None:
    """A float as Dagster metadata with ``digits`` significant digits (the UI shows every digit it is given); None
    for a missing or non-finite value."""
    if value is None or not math.isfinite(float(value)):
        return None
    return dg.MetadataValue.float(float(f"{float(value):.{digits}g}"))


def member_figures(sweep) -> dict:
    """A sweep's numbers as numeric metadata, so the asset's Plots tab charts them run after run: ``best_nmse`` and
    ``best_l0`` (of the member with the lowest held-out NMSE, ``nn.metrics.best_member``, named in ``best_member``),
    and ``nmse/<member_id>``, ``l0/<member_id>`` for every member. ``sweep``: the sweep.csv table (pandas)."""
    from saev_core.nn import metrics

    rows = sweep.to_dict("records")
    best = metrics.best_member(rows)
    figures = {}
    if best is not None:
        figures = {"best_nmse": rounded(best["nmse"]), "best_l0": rounded(best["l0"]), "best_member": best["member_id"]}
    for row in rows:
        for name in ("nmse", "l0"):
            figures[f"{name}/{row['member_id']}"] = rounded(row.get(name))
    return {k: v for k, v in figures.items() if v is not None}
