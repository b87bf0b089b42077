"""The store on object storage: record, train and render through s3:// against a local S3-compatible server
(moto's standalone server on 127.0.0.1, started and stopped by this test)."""

import glob
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from saev_core.__main__ import main
from saev_core.store import ActivationStore
from tests.helpers import write_images


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    """A moto S3 server on a free loopback port, with credentials and endpoint in the environment; yields the URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }.items():
        monkeypatch.setenv(key, value)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="acts")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_record_train_and_render_with_the_store_on_s3(s3_server, tmp_path, tiny_clip_ckpt, capsys):
    write_images(tmp_path / "imgs", 6)
    assert (
        main(
            [
                "activations",
                "--vit-family",
                "clip",
                "--vit-ckpt",
                tiny_clip_ckpt,
                "--vit-layers",
                "-1",
                "--dump-to",
                "s3://acts/stores",
                "--n-workers",
                "0",
                "data:image-folder-dataset",
                "--data.root",
                str(tmp_path / "imgs"),
            ]
        )
        == 0
    )
    store_url = capsys.readouterr().out.strip().splitlines()[-1]
    assert store_url.startswith("s3://acts/stores/")
    store = ActivationStore.open(store_url)
    assert store.is_complete and store.n_imgs == 6

    assert (
        main(
            [
                "train",
                "--data.shard-root",
                store_url,
                "--data.layer",
                "-1",
                "--sae.d-vit",
                "64",
                "--sae.exp-factor",
                "2",
                "--sae.arch",
                "topk",
                "--sae.k",
                "4",
                "--n-patches",
                "2048",
                "--sae-batch-size",
                "64",
                "--ckpt-path",
                str(tmp_path / "ckpt"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    [ckpt] = glob.glob(str(tmp_path / "ckpt" / "*" / "sae.pt"))
    assert (
        main(
            [
                "visuals",
                "--ckpt",
                ckpt,
                "--dump-to",
                str(tmp_path / "vis"),
                "--top-k",
                "4",
                "--log-freq-range",
                "-9",
                "0",
                "--log-value-range",
                "-9",
                "9",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "vis" / "index.html")
