"""Where a store is: what zarr opens for a local path or a URL (``zarr_store``), and, for a local path that is not
a store, what it is instead (missing, a file, a part of a store, the folder of stores above one) and which path to
pass (``check_local_store_path``)."""

import json
import os

import zarr

from saev_core.errors import UserError
from saev_core.files import is_url, storage_options, url_filesystem


def zarr_store(path: str, mode: str):
    """What zarr opens: a local path or a URL as is, except s3:// URLs, opened over the file system of
    ``files.url_filesystem`` (bounded connect and read timeouts and retries) so no request waits forever."""
    if not is_url(path) or not storage_options(path):
        return path
    fs, root = url_filesystem(path, asynchronous=True)
    return zarr.storage.FsspecStore(fs, path=root, read_only=mode == "r")


def check_local_store_path(path: str) -> None:
    """A local path that is not a store: say what it is instead (missing, a file, a part of a store, the folder of
    stores above one) and which path to pass."""
    printed = "Pass the path that `python -m saev_core activations` printed on its last line (<dump_to>/<key>)."
    if not os.path.isdir(path):
        what = "is a file, not an activation store" if os.path.exists(path) else "does not exist"
        raise UserError(f"No activation store at {path!r}: it {what}. {printed}")
    if is_store_folder(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent):
        if is_store_folder(parent):
            raise UserError(
                f"{path!r} is a part (an array or group) inside the activation store {parent}; pass "
                f"the store itself: {parent}"
            )
        parent = os.path.dirname(parent)
    try:
        stores = sorted(name for name in os.listdir(path) if is_store_folder(os.path.join(path, name)))
    except OSError:
        stores = []
    if stores:
        shown = ", ".join(os.path.join(path, s) for s in stores[:3]) + (" ..." if len(stores) > 3 else "")
        raise UserError(
            f"{path!r} is the folder that holds activation stores (--dump-to), not a store; pass one "
            f"of the stores in it: {shown}"
        )
    raise UserError(
        f"No activation store at {path!r}: the folder has no zarr.json with a store's format_version "
        f"(a recording killed while creating the store leaves that: run it again). {printed}"
    )


def is_store_folder(folder: str) -> bool:
    """Whether ``folder`` holds a zarr group whose attributes carry the store's format_version."""
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict) and meta.get("node_type") == "group" and "format_version" in meta.get("attributes", {})
    )
