"""Paths, URLs and atomic writes: the one place that decides what a complete file on disk is.

Every file a user may read while a run is going (checkpoints, state files, tables, plots, weights) is written to a
temporary file in the same folder, flushed and fsynced, renamed over the target, and the folder is fsynced: a
killed run leaves the old file or the new one, never half of one, and a power loss does not lose the rename.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import BinaryIO

from saev_core.errors import UserError


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://``, ``memory://``...) rather than a local path."""
    return "://" in str(path)


def join(root: str, name: str) -> str:
    """``root/name`` for a local folder or a URL."""
    return root.rstrip("/") + "/" + name if is_url(root) else os.path.join(root, name)


def absolute(path: str) -> str:
    """A local path made absolute (so it works from any folder and any Dagster run worker); URLs unchanged."""
    return path if is_url(path) else os.path.abspath(path)


def inside(folder: str | os.PathLike, *parts, what: str = "name") -> str:
    """``folder/part/part...`` for names that come from data (a member id from sweep.csv, a latent id, a file name
    from a cache or a watched folder), refused with a UserError naming the bad part when one is not a plain name
    (empty, ``.``, ``..``, a separator, a NUL byte, an absolute path) or when the resolved path (symbolic links
    followed) leaves ``folder``. Every writer that builds a path from data goes through here."""
    folder = os.fspath(folder)
    for part in parts:
        text = str(part)
        if (
            text in ("", ".", "..")
            or "/" in text
            or "\\" in text
            or "\0" in text
            or (os.altsep and os.altsep in text)
            or os.path.isabs(text)
        ):
            raise UserError(
                f"Refusing {what} {text!r}: it is not a plain file name, so the path built from it would leave "
                f"{folder}. Fix the {what} where it comes from (a sweep.csv, a cache, a file name)."
            )
    path = os.path.join(folder, *map(str, parts))
    if is_url(folder):
        return path
    root = os.path.realpath(folder)
    resolved = os.path.realpath(path)
    if os.path.commonpath([root, resolved]) != root:
        raise UserError(
            f"Refusing {what} {'/'.join(map(str, parts))!r}: {path} resolves to {resolved}, outside {folder} "
            "(a symbolic link points out of it). Remove the link or choose another output folder."
        )
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], durable: bool = True) -> str:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, rename it over ``path`` and fsync the
    folder. Creates the folder. Returns the absolute path.

    A file-system failure (read-only, permission, a file where a folder should be, disk full, also inside torch's
    writer) is a UserError naming ``path``. Temporaries that a killed process left in the folder are removed first.
    ``durable=False`` skips both fsyncs, for many small files that are cheap to make again: a killed run still leaves
    the old file or the new one, but a power loss may lose the rename.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(path), suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the output gets the user's usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            remove_if_exists(tmp)
        if isinstance(err, OSError) or _is_torch_write_error(err):
            raise write_error(path, err) from None
        raise
    if durable:
        fsync_folder(folder)
    return path


def write_error(path: str | os.PathLike, err: BaseException, action: str = "write") -> UserError:
    """The UserError for a failed write (or other ``action``) on ``path``: what the file system said, in words, and
    what to do."""
    path = os.fspath(path)
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or _is_torch_write_error(err):
        free = _free_bytes(os.path.dirname(path) or ".")
        room = f" ({free / 1e6:.1f} MB free there)" if free is not None else ""
        why = "the disk is full" if code else "the write stopped part-way, most likely on a full disk"
        return UserError(
            f"Cannot {action} {path}: {why}{room}. Free some space or choose another output folder, then "
            "run the same command again (finished work is kept)."
        )
    if code == errno.EROFS:
        why, fix = "the file system is read-only", "choose an output folder on a writable disk"
    elif code in (errno.EACCES, errno.EPERM):
        why, fix = "permission denied", "choose an output folder you may write to, or fix its permissions"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        why, fix = "a file is in the way where a folder is needed", "move that file or choose another output folder"
    elif code == errno.EISDIR:
        why, fix = "it is a folder", "remove that folder or choose another output path"
    else:
        why, fix = getattr(err, "strerror", None) or str(err), "check the output path"
    where = getattr(err, "filename", None)
    where = f" ({where})" if where and os.fspath(where) != path else ""
    return UserError(f"Cannot {action} {path}{where}: {why}. Fix: {fix}.")


def _is_torch_write_error(err: BaseException) -> bool:
    """torch.save's C++ writer reports a failed write (a full disk) as a RuntimeError: "unexpected pos ..." or
    "PytorchStreamWriter failed writing file ..."."""
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text)


def _free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_output_folder(path: str, flag: str) -> None:
    """Fail at once, before any work, when the output folder ``path`` (given as ``flag``) cannot be written: it is a
    file, a file stands where one of its parents should be, or the nearest existing folder is read-only or not ours.
    URLs are checked when they are opened."""
    if is_url(path):
        return
    path = os.path.abspath(path)
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is a file" if probe == path else f"cannot be created: {probe} is a file, not a folder"
        raise UserError(f"{flag} {path} {what}. Pass a folder (it is created if missing), or move the file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(probe) else "permission denied"
        raise UserError(f"{flag} {path} cannot be written ({why} at {probe}). Pass a folder you may write to.")


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


# Temporaries carry the writer's host and process id, so a later run can tell a killed writer's leftovers from a live
# one's, also on a folder that several machines share (the pid of a writer on another host means nothing here).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY_RE = re.compile(r"^\..+-([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]+\.(tmp|partial)$")
_CLEANED: set[str] = set()


def temporary_prefix(path: str | os.PathLike) -> str:
    """The start of a temporary file's name for ``path``: hidden, with this host and process (see
    ``remove_stale_temporaries``)."""
    return f".{os.path.basename(path)}-{_HOST}-{os.getpid()}-"


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporaries in ``folder`` that a process of this host left and that no longer runs (a crash or
    kill -9 left them); once per folder and process. Returns the removed paths."""
    if folder in _CLEANED:
        return []
    _CLEANED.add(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY_RE.match(name)
        if match and match.group(1) == _HOST and not process_is_alive(int(match.group(2))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


def process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists but is someone else's (or cannot be asked): leave its files alone
    return True


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it: done under a lock and restored at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj) -> str:
    """Indented JSON (values that are not JSON written as strings), atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def read_json(path: str | os.PathLike):
    """The parsed file, or None when it does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_if_exists(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def check_url(url: str, flag: str) -> None:
    """Fail at once when fsspec cannot open ``url``'s protocol (unknown, or its package, s3fs for s3://, missing) or
    when an s3:// bucket cannot be reached (``check_storage``)."""
    if not is_url(url):
        return
    import fsspec

    protocol = str(url).split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        package = {"s3": "s3fs (pip install -e '.[s3]')", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
        raise UserError(
            f"{flag} {url!r}: the {protocol}:// file system needs a package that is not installed "
            f"({str(err).splitlines()[0]}). Install {package.get(protocol, 'it')}, or pass a local path."
        ) from None
    except ValueError:
        raise UserError(
            f"{flag} {url!r}: unknown URL protocol {protocol!r}. Pass a local path or a URL fsspec knows "
            "(s3://, gs://, memory://, file://...)."
        ) from None
    check_storage(url, flag)


# ----------------------------------------------------------------------------------------------------------------
# Object storage: bounded waits and one line when it cannot be reached
# ----------------------------------------------------------------------------------------------------------------

STORAGE_TIMEOUT_ENV = "SAEV_STORAGE_TIMEOUT"
"""Seconds to wait for object storage to accept a connection, and then for each read (default 5)."""
STORAGE_ATTEMPTS_ENV = "SAEV_STORAGE_ATTEMPTS"
"""Tries of a request that timed out or lost its connection before giving up (default 2)."""
_BOUNDED_PROTOCOLS = ("s3", "s3a")
_PROBED: set[tuple[str, str, str]] = set()


def storage_limits() -> tuple[float, int]:
    """(timeout in seconds, attempts) from $SAEV_STORAGE_TIMEOUT and $SAEV_STORAGE_ATTEMPTS. The defaults make an
    endpoint that accepts and never answers fail in about 20 s (two requests of the bucket check, two tries each)."""
    try:
        timeout = float(os.environ.get(STORAGE_TIMEOUT_ENV) or 5)
        attempts = int(os.environ.get(STORAGE_ATTEMPTS_ENV) or 2)
    except ValueError:
        timeout, attempts = -1.0, -1
    if not (0 < timeout < float("inf")) or attempts < 1:
        raise UserError(
            f"${STORAGE_TIMEOUT_ENV}={os.environ.get(STORAGE_TIMEOUT_ENV)!r} and ${STORAGE_ATTEMPTS_ENV}="
            f"{os.environ.get(STORAGE_ATTEMPTS_ENV)!r}: expected seconds > 0 and a whole number >= 1 (or unset)."
        )
    return timeout, attempts


def _protocol(url: str) -> str:
    return str(url).split("://", 1)[0].lower()


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: for s3://, connect and read timeouts of $SAEV_STORAGE_TIMEOUT seconds and no
    retries inside botocore (s3fs retries, ``url_filesystem`` sets how often); {} for other protocols."""
    if _protocol(url) not in _BOUNDED_PROTOCOLS:
        return {}
    timeout, _ = storage_limits()
    retries = {"max_attempts": 1, "mode": "standard"}
    return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout, "retries": retries}}


def url_filesystem(url: str, asynchronous: bool = False):
    """(fsspec file system, path) of ``url`` with the bounded options of ``storage_options``; s3fs's own retries
    (a class default of 5, not a constructor argument) set to $SAEV_STORAGE_ATTEMPTS on this instance."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, asynchronous=asynchronous, **storage_options(url))
    if _protocol(url) in _BOUNDED_PROTOCOLS:
        fs.retries = storage_limits()[1]
    return fs, path


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"


def storage_error(url: str, flag: str, err: BaseException, bucket_check: bool = False) -> UserError | None:
    """The one line for a failure to reach object storage (None when ``err`` is not one): what happened, the URL
    and endpoint, and the fix. A FileNotFoundError means a missing bucket only in the bucket check (elsewhere it is
    a missing store, which its reader explains)."""
    name = type(err).__name__
    text = str(err).splitlines()[0] if str(err) else name
    bucket = str(url).split("://", 1)[-1].split("/", 1)[0]
    where = f"{flag} {url}"
    timeout, attempts = storage_limits()
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return UserError(
            f"{where}: no object-storage credentials were found ({text}). Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a server other than AWS."
        )
    if isinstance(err, FileNotFoundError):
        if not bucket_check:
            return None
        return UserError(
            f"{where}: the bucket {bucket!r} does not exist at {_endpoint()} ({text}). Create it, or fix the "
            "bucket name or AWS_ENDPOINT_URL."
        )
    if isinstance(err, PermissionError) or (name == "ClientError" and "403" in text):
        return UserError(
            f"{where}: access to the bucket {bucket!r} at {_endpoint()} was denied ({text}). Check the credentials "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket's permissions."
        )
    if name in ("ReadTimeoutError", "FSTimeoutError", "TimeoutError", "ConnectTimeoutError") or isinstance(
        err, TimeoutError
    ):
        return UserError(
            f"{where}: {_endpoint()} did not answer within {timeout:g} s ({attempts} tries: {text}). Check that "
            f"AWS_ENDPOINT_URL names a running S3 server; on a slow link raise ${STORAGE_TIMEOUT_ENV} (seconds) or "
            f"${STORAGE_ATTEMPTS_ENV}."
        )
    if name in ("EndpointConnectionError", "ConnectionClosedError", "ProxyConnectionError", "SSLError") or isinstance(
        err, ConnectionError
    ):
        return UserError(
            f"{where}: cannot connect to {_endpoint()} ({text}). Check AWS_ENDPOINT_URL and that the server is up "
            "and reachable from here."
        )
    if type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs"):
        return UserError(f"{where}: object storage failed ({name}: {text}). Check the URL, credentials and endpoint.")
    return None


@contextlib.contextmanager
def storage_errors(url: str, flag: str, bucket_check: bool = False):
    """Inside: a failure to reach object storage at ``url`` becomes one UserError line (``storage_error``)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not is_url(url):
            raise
        converted = storage_error(url, flag, err, bucket_check)
        if converted is None:
            raise
        raise converted from None


def check_storage(url: str, flag: str) -> None:
    """Before any work on an s3:// URL: its bucket can be reached with the credentials at hand (one request, bounded
    by $SAEV_STORAGE_TIMEOUT and $SAEV_STORAGE_ATTEMPTS), else one line naming the URL and the fix. Once per bucket
    and endpoint per process."""
    if _protocol(url) not in _BOUNDED_PROTOCOLS:
        return
    with storage_errors(url, flag, bucket_check=True):
        fs, path = url_filesystem(url)
        bucket = path.split("/", 1)[0]
        key = (_protocol(url), bucket, _endpoint())
        if key in _PROBED:
            return
        fs.info(bucket)
    _PROBED.add(key)
