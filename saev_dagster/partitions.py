"""One partition per recorded layer; keys are the layers as the user wrote them ("-2")."""

import dagster as dg


def layer_partitions(layers: tuple[int, ...] | list[int]) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(layer) for layer in layers])


def layers_of(partition_keys: list[str]) -> tuple[int, ...]:
    return tuple(int(key) for key in partition_keys)
