"""Reading what other jobs wrote, as the explorer needs it: without importing torch where it can be helped (a
checkpoint's file name and provenance), and without failing on a file it can do without (it says what it left out
instead)."""

import os

from saev_core.errors import UserError
from saev_core.files import read_json


def provenance(ckpt: str | None) -> dict:
    """A checkpoint's provenance from its header alone (no weights read); {} when there is none or it is unreadable
    (the caller then says what is missing)."""
    if ckpt is None:
        return {}
    from saev_core.nn import checkpoint

    try:
        return checkpoint.read_provenance(ckpt)
    except UserError:
        return {}


def ckpt_file(path: str) -> str:
    """``nn.ckpt_file`` without importing torch: the path itself, or ``path/sae.pt`` for a member's folder."""
    return os.path.join(path, "sae.pt") if os.path.isdir(path) else path


def read_optional_json(path: str, what: str) -> tuple[dict | None, str | None]:
    """(the JSON object at ``path``, None), (None, None) when there is no file, or (None, why it was ignored) when it
    cannot be read: the explorer shows what it has and says what it left out, rather than failing."""
    try:
        doc = read_json(path)
    except (OSError, ValueError) as err:
        return None, f"{what} {path} cannot be read ({type(err).__name__}: {err}); it is left out."
    if doc is not None and not isinstance(doc, dict):
        return None, f"{what} {path} is not a JSON object; it is left out."
    return doc, None
