"""The one atomic write: complete or absent, no temporary file left, the user's umask honoured."""

import os
import stat

import pytest

from saev_core import files


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
