"""The visuals job's npz caches (``cache/topk.npz``, ``cache/association.npz``): named arrays plus one ``meta`` entry
holding a JSON object that records what made them (docs/visuals-format.md). Written atomically; read back with one
error for every way a damaged file fails."""

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np

from saev_core.errors import UserError
from saev_core.files import atomic_write

T = TypeVar("T")


def write_npz_with_meta(path: str, meta: dict, arrays: dict[str, np.ndarray]) -> str:
    """``meta`` (as a JSON string) then ``arrays``, in that order, as one npz file written atomically."""
    return atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))


def read_npz_with_meta(
    path: str, names: Iterable[str], build: Callable[[dict, dict[str, np.ndarray]], T], what: str = ""
) -> T | None:
    """``build(meta, arrays)`` from the npz at ``path`` (the arrays ``names``); None when there is no file.

    A damaged file fails in many ways (zip, JSON, missing keys, wrong types, also inside ``build``): each is one
    UserError, "``what`` {path} cannot be read (...); delete it to compute it again."."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {name: z[name] for name in names}
        return build(meta, arrays)
    except Exception as err:  # noqa: BLE001 - see above
        named = f"{what} {path}" if what else path
        raise UserError(
            f"{named} cannot be read ({type(err).__name__}: {err}); delete it to compute it again."
        ) from None


def identity_mismatch(meta: dict, identity) -> str:
    """``""`` when ``meta`` records the dataclass ``identity`` field for field; else what differs, as
    ``"field: cache X vs now Y, ..."``."""
    wanted = dataclasses.asdict(identity)
    return ", ".join(f"{k}: cache {meta.get(k)!r} vs now {v!r}" for k, v in wanted.items() if meta.get(k) != v)
