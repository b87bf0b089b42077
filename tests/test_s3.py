"""The store on object storage: record, train and render through s3:// against a local S3-compatible server
(moto's standalone server on 127.0.0.1, started and stopped by this test)."""

import glob

import pytest

from saev_core.__main__ import main
from saev_core.store import ActivationStore
from tests.helpers import TINY_SAE_FLAGS, activations_argv, write_images
from tests.processes import moto_server


@pytest.fixture
def s3_server(monkeypatch):
    """A moto S3 server on a free loopback port with the bucket ``acts``, its credentials and endpoint in the
    environment; yields the URL."""
    with moto_server("acts") as url:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
        }.items():
            monkeypatch.setenv(key, value)
        yield url


def test_record_train_and_render_with_the_store_on_s3(s3_server, tmp_path, tiny_clip_ckpt, capsys):
    write_images(tmp_path / "imgs", 6)
    assert main(activations_argv(tiny_clip_ckpt, tmp_path / "imgs", "s3://acts/stores", "--vit-layers", "-1")) == 0
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
                *TINY_SAE_FLAGS,
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
