"""Dagster metadata helpers: Dagster has no image metadata type, so a PNG goes inline as a base64 data URI."""

import base64

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def latest_materialization_value(context: dg.AssetExecutionContext, asset: str, partition: str, key: str):
    """A metadata value of the latest materialization of asset[partition]: how an asset finds what the one
    upstream of it wrote (lineage through metadata)."""
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    )
    if not result.records:
        raise dg.Failure(description=f"{asset}[{partition}] has never been materialized; materialize it first.")
    return result.records[0].asset_materialization.metadata[key].value


def latest_store_path(context: dg.AssetExecutionContext, partition: str) -> str:
    """The store that the latest materialization of activations[partition] wrote."""
    return latest_materialization_value(context, "activations", partition, "store_path")
