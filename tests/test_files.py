"""The one atomic write: complete or absent, no temporary file left, the user's umask honoured."""

import os
import stat

import pytest

from saev_core import files
from saev_core.errors import UserError


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = files.atomic_write_bytes(tmp_path / "out" / "f.bin", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert open(path, "rb").read() == b"data"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.json"
    files.atomic_write_json(target, {"a": 1})

    def half_then_fail(f):
        f.write(b"{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, half_then_fail)
    assert files.read_json(target) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_urls_and_paths():
    assert files.is_url("s3://b/k") and files.is_url("memory://x") and not files.is_url("/a/b")
    assert files.join("s3://b/k/", "x") == "s3://b/k/x" and files.join("/a", "x") == "/a/x"
    assert files.absolute("s3://b") == "s3://b" and os.path.isabs(files.absolute("rel"))


def test_only_this_hosts_dead_writers_temporaries_are_removed(tmp_path):
    """A kill -9 leaves a temporary; the next write removes it, but not a live writer's, nor one written by another
    machine on a shared folder (its process id means nothing here)."""
    import subprocess

    from saev_core import files

    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid  # finished and reaped: no process has this id now (barring reuse within the test)
    target = tmp_path / "out.bin"
    ours_dead = tmp_path / f".out.bin-{files._HOST}-{dead}-abc.tmp"
    ours_alive = tmp_path / f"{files.temporary_prefix(target)}def.tmp"
    other_host = tmp_path / f".out.bin-0123abcd-{dead}-ghi.tmp"
    for p in (ours_dead, ours_alive, other_host):
        p.write_bytes(b"half")
    files.atomic_write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not ours_dead.exists() and ours_alive.exists() and other_host.exists()


def test_inside_refuses_every_kind_of_escape(tmp_path):
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path, tmp_path / "out" / "link")
    assert files.inside(tmp_path / "out", "a", "b.png") == str(tmp_path / "out" / "a" / "b.png")
    for bad in ["..", ".", "", "a/../..", "/etc", "a\\b", "x\0y"]:
        with pytest.raises(UserError, match="not a plain file name"):
            files.inside(tmp_path / "out", bad)
    with pytest.raises(UserError, match="outside"):
        files.inside(tmp_path / "out", "link", "x")


def test_object_storage_waits_are_bounded_and_the_user_can_raise_them(monkeypatch):
    monkeypatch.delenv(files.STORAGE_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(files.STORAGE_ATTEMPTS_ENV, raising=False)
    assert files.storage_limits() == (5.0, 2)
    config = files.storage_options("s3://bucket/acts")["config_kwargs"]
    assert (config["connect_timeout"], config["read_timeout"], config["retries"]["max_attempts"]) == (5.0, 5.0, 1)
    assert files.storage_options("memory://acts") == {} and files.storage_options("/local/acts") == {}
    monkeypatch.setenv(files.STORAGE_TIMEOUT_ENV, "60")
    monkeypatch.setenv(files.STORAGE_ATTEMPTS_ENV, "5")
    assert files.storage_limits() == (60.0, 5)
    for timeout, attempts in [("abc", "2"), ("0", "2"), ("inf", "2"), ("5", "0"), ("5", "1.5")]:
        monkeypatch.setenv(files.STORAGE_TIMEOUT_ENV, timeout)
        monkeypatch.setenv(files.STORAGE_ATTEMPTS_ENV, attempts)
        with pytest.raises(UserError, match=files.STORAGE_TIMEOUT_ENV):
            files.storage_limits()
