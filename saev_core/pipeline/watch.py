"""A watched folder of SAE checkpoint files that came from elsewhere (another machine, a colleague, saev 0.1.0):
each file gets top-k visuals of its own, and a file changed in place gets them again (Dagster's
``sae_checkpoints`` source and ``dropped_sae_visuals`` asset, one partition per file name).

A file from saev 0.1.0 records no provenance (which store, layer and token mode it was trained on): put a sidecar
JSON beside it, ``<file>.provenance.json`` (or one ``provenance.json`` for the whole folder), with
``{"store": "<store path>", "layer": -2, "token_mode": "patches"}``.
"""

import dataclasses
import hashlib
import json
import os

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import inside

SAE_SUFFIXES = (".pt",)
SIDECAR_KEYS = ("store", "layer", "token_mode")


def sae_files(folder: str) -> dict[str, str]:
    """{file name: fingerprint of (size, mtime)} of every checkpoint file directly in ``folder`` (sorted)."""
    if not os.path.isdir(folder):
        raise UserError(f"The watched folder {folder!r} ([watch] folder) does not exist; create it or fix the path.")
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(SAE_SUFFIXES) and not name.startswith(".") and os.path.isfile(path):
            st = os.stat(path)
            found[name] = hashlib.sha256(json.dumps([name, st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]
    return found


def sidecar(folder: str, name: str) -> dict | None:
    """The provenance sidecar of a dropped file, checked; None when there is none."""
    for path in (os.path.join(folder, f"{name}.provenance.json"), os.path.join(folder, "provenance.json")):
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    doc = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise UserError(
                    f"Cannot read the provenance sidecar {path} ({err}); it must be JSON like "
                    '{"store": "<store path>", "layer": -2, "token_mode": "patches"}.'
                ) from None
            missing = [k for k in SIDECAR_KEYS if k not in doc]
            if missing:
                raise UserError(f"The provenance sidecar {path} lacks {missing}; it needs store, layer and token_mode.")
            return doc
    return None


def dropped_visuals_config(
    template: config.VisualsConfig, folder: str, name: str, dump_root: str
) -> config.VisualsConfig:
    """The visuals config of one dropped file: the pipeline's [visuals] flags, the file as checkpoint, the data from
    its sidecar when there is one, output in <dump_root>/<file name>/."""
    from saev_core import nn

    out = inside(dump_root, name, what="file name")  # a plain name, so the file read is in the folder too
    ckpt = os.path.join(folder, name)  # read as is: a symbolic link to a checkpoint elsewhere is fine
    side = sidecar(folder, name)
    if side is None:
        prov = nn.load(ckpt).provenance
        if not all(prov.get(k) is not None for k in ("store", "layer", "token_mode")):
            raise UserError(
                f"{ckpt} records no provenance (which store, layer and token mode it was trained on; saev 0.1.0 files "
                f"do not). Put a sidecar JSON beside it, {ckpt}.provenance.json, with "
                '{"store": "<store path>", "layer": -2, "token_mode": "patches"}.'
            )
        data = template.data
    else:
        data = config.VisualsDataConfig(shard_root=side["store"], layer=int(side["layer"]), patches=side["token_mode"])
    return dataclasses.replace(template, ckpt=ckpt, data=data, dump_to=out)
