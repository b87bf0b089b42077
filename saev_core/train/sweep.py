"""Sweeps: expand a TOML of lists into configs, and group the configs that can share one pass over the data.

A sweep file has the ``Train`` field names as keys: top-level keys, a ``[sae]`` table and a ``[data]`` table, any
subset of them. A list value is swept over; a scalar is kept. Every combination is trained (full Cartesian
product), in saev's order: keys in file order, the last key varying fastest, nested tables flattened in place.
An array of tables (``[[sae]]``) lists alternatives, each expanded on its own: ``[[sae]] arch = "topk"
k = [16, 32]`` plus ``[[sae]] arch = "relu" sparsity_coeff = [1e-4, 4e-4]`` gives four SAEs, not a product of
every field. A tuple-typed field takes a list of lists (each inner list is one value).

This module imports neither torch nor ``saev_core.config`` at import time, so ``config`` can re-export it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import tomllib
import typing
from typing import TYPE_CHECKING, Any

from saev_core.errors import UserError
from saev_core.tables import coerce, describe_type, field_names, unknown_key, wrong_type

if TYPE_CHECKING:
    from saev_core import config

# Top-level ``Train`` fields that change what the loader reads, or in what order: configs that differ in any of
# them cannot share one data pass. ``data`` stands for every ``data.*`` field. Everything under ``sae`` (width and
# architecture included; ``d_vit`` is checked against the store by the trainer) and the optimiser and logging
# settings can differ inside a group. ``ckpt_path``, ``device`` and ``n_threads`` split too: one pass runs on one
# device, with one thread count, and writes under one folder. A ``Train`` field in neither list also splits
# (splitting is always safe, only slower).
DATA_PASS_FIELDS: tuple[str, ...] = ("data", "n_patches", "sae_batch_size", "seed", "device", "n_threads", "ckpt_path")

# ``Train`` fields that members of one data pass may set differently.
PER_MEMBER_FIELDS: tuple[str, ...] = (
    "sae",
    "lr",
    "n_lr_warmup",
    "n_sparsity_warmup",
    "max_grad_norm",
    "ckpt_every",
    "log_every",
    "sweep",
    "sparse_topk",
)

# Fields that cannot change a trained SAE, left out of ``member_id`` so that moving the checkpoint folder, logging
# more often or running on another device, thread count or topk code path finds the same member. (cpu and cuda,
# 1 and 8 threads, or sparse and dense topk differ in the last bits of float arithmetic; we count that as the same
# experiment.)
MEMBER_ID_IGNORED: tuple[str, ...] = (
    "ckpt_path",
    "log_every",
    "ckpt_every",
    "sweep",
    "device",
    "n_threads",
    "sparse_topk",
)


# ----------------------------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------------------------


def expand(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the list values in ``d`` (nested dicts expanded in place), last key varying fastest.

    ``{"lr": [1, 2], "sae": {"k": [8, 16]}}`` gives lr=1,k=8; lr=1,k=16; lr=2,k=8; lr=2,k=16. Scalars are kept.
    A dict inside a list is expanded on its own and its expansions become options. Keys keep their order.
    """
    options: list[list[Any]] = []
    for value in d.values():
        if isinstance(value, dict):
            options.append(expand(value))
        elif isinstance(value, list):
            options.append([o for v in value for o in (expand(v) if isinstance(v, dict) else [v])])
        else:
            options.append([value])
    return [dict(zip(d.keys(), combo)) for combo in itertools.product(*options)]


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """Read a sweep TOML file."""
    try:
        with open(path, "rb") as fd:
            return tomllib.load(fd)
    except FileNotFoundError:
        raise UserError(f"Sweep file not found: {os.fspath(path)!r}. Check the path given to --sweep.") from None
    except OSError as err:
        raise UserError(f"Cannot read sweep file {os.fspath(path)!r}: {err}.") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"Sweep file {os.fspath(path)!r} is not valid TOML: {err}.") from None


def grid(base: config.TrainConfig, sweep: dict[str, Any], source: str = "<sweep>") -> list[config.TrainConfig]:
    """One ``Train`` per combination of ``sweep``'s list values, each applied onto ``base``.

    Keys and value types are checked against the dataclass fields first; a bad one raises ``UserError`` naming
    the key, the value and ``source``. Member i gets ``sae.seed = base.sae.seed + i``, unless the sweep sets
    ``sae.seed`` itself (anywhere, even as a scalar): then every member keeps the seed the sweep gives it.
    """
    _check_table(sweep, type(base), "", source)
    try:
        cfgs = [_apply(base, d) for d in expand(sweep)]
    except UserError as err:  # a value out of range (config.check_fields): say which file holds it
        raise UserError(f"{source}: {err}") from None
    if _sets_sae_seed(sweep):
        return cfgs
    return [
        dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, seed=base.sae.seed + i)) for i, cfg in enumerate(cfgs)
    ]


def _sets_sae_seed(sweep: dict[str, Any]) -> bool:
    tables = sweep.get("sae", [])
    tables = tables if isinstance(tables, list) else [tables]
    return any(isinstance(t, dict) and "seed" in t for t in tables)


def _check_table(table: Any, cls: type, path: str, source: str) -> None:
    if not isinstance(table, dict):
        if not path:
            raise UserError(f"The sweep in {source} must be a table of {cls.__name__} fields, not {table!r}.")
        raise UserError(f"{path} = {table!r} in {source}: expected a table [{path}] of {cls.__name__} fields.")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    for key, value in table.items():
        dotted = f"{path}.{key}" if path else key
        if key not in names:
            raise unknown_key(key, names, path, source, prefix=f"{path}." if path else "")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise UserError(f"{dotted} = [] in {source}: an empty list gives no configs; give at least one value.")
        tp = hints[key]
        for v in values:
            if dataclasses.is_dataclass(tp):
                _check_table(v, tp, dotted, source)
            elif isinstance(v, dict):
                raise UserError(f"{dotted} is a table in {source}: expected {describe_type(tp)}.")
            else:
                try:
                    coerce(v, tp)
                except TypeError:
                    hint = (
                        " A list is swept over; write a list of lists to give tuple values."
                        if (typing.get_origin(tp) is tuple)
                        else ""
                    )
                    raise wrong_type(dotted, v, tp, source, hint) from None


def _apply(obj: Any, d: dict[str, Any]) -> Any:
    """``obj`` with the (already checked) values of ``d`` replaced, nested tables onto nested dataclasses."""
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in d.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = _apply(getattr(obj, key), value)
        else:
            changes[key] = coerce(value, tp)
    return dataclasses.replace(obj, **changes)


# ----------------------------------------------------------------------------------------------------------------
# Grouping and identity
# ----------------------------------------------------------------------------------------------------------------


def split_cfgs(cfgs: list[config.TrainConfig]) -> list[list[config.TrainConfig]]:
    """Group configs that can share one data pass (equal in every field of ``DATA_PASS_FIELDS``, and in any
    ``Train`` field listed in neither constant). Groups come in order of first appearance; members keep input order.
    """
    groups: list[tuple[tuple[Any, ...], list[config.TrainConfig]]] = []
    for cfg in cfgs:
        key = _data_pass_key(cfg)
        for k, members in groups:
            if k == key:
                members.append(cfg)
                break
        else:
            groups.append((key, [cfg]))
    return [members for _, members in groups]


def _data_pass_key(cfg: config.TrainConfig) -> tuple[Any, ...]:
    names = [f.name for f in dataclasses.fields(cfg)]
    unclassified = [n for n in names if n not in DATA_PASS_FIELDS and n not in PER_MEMBER_FIELDS]
    return tuple((n, getattr(cfg, n)) for n in [*DATA_PASS_FIELDS, *unclassified] if n in names)


MEMBER_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
"""What ``member_id`` makes: 12 lowercase hex digits. Readers of sweep.csv check ids against it before building a
folder name from one (``check_member_id``)."""


def check_member_id(value: Any, source: str) -> str:
    """``value`` as a member id, or a UserError naming ``source`` (the sweep.csv it came from) when it does not
    match ``MEMBER_ID_PATTERN`` (a hand-edited or foreign table: ``../x`` must not become a folder name)."""
    text = str(value)
    if not MEMBER_ID_PATTERN.fullmatch(text):
        raise UserError(
            f"member_id {text!r} in {source} is not a member id (12 lowercase hex digits, as `train` writes them). "
            "Fix or remove that row, or train the sweep again to rewrite the table."
        )
    return text


def member_id(cfg: config.TrainConfig) -> str:
    """12 hex digits of sha256 over the canonical JSON of ``cfg`` (sorted keys, ints in float fields as floats)
    without the fields of ``MEMBER_ID_IGNORED``. Equal settings give equal ids across runs and machines; adding
    a field to ``Train`` changes every id (old checkpoints are then not reused, which is the safe side)."""
    canonical = {k: v for k, v in _canonical(cfg).items() if k not in MEMBER_ID_IGNORED}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        hints = typing.get_type_hints(type(obj))
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            tp = hints.get(f.name)
            is_float = tp is float or float in typing.get_args(tp)  # float, or float | None
            if is_float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            out[f.name] = _canonical(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj
