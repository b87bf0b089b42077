"""Recording's forward pass follows the thread rule of training (saev_core.threads): each batch is one timed step,
the count it moves to is torch's for the next batch, and torch's count is put back after. Timed with a fake clock."""

import numpy as np
import torch

from saev_core import threads
from saev_core.record import vit as vitlib
from saev_core.record.hot_loop import block_batches, record_batches
from saev_core.store import ActivationStore, arrays_metadata


def test_recording_moves_to_the_faster_count_and_records_the_same_values(tmp_path, tiny_clip_ckpt):
    vit = vitlib.make_vit("clip", tiny_clip_ckpt)
    recorder = vitlib.RecordedVisionTransformer(vit, vit.n_patches_per_img, True, [-1]).eval()
    n_imgs, batch = 32, 4
    n_tokens = vit.n_patches_per_img + 1
    meta = arrays_metadata(
        n_imgs,
        n_tokens,
        vit.d_vit,
        [-1],
        imgs_per_shard=16,
        resolved_layers=tuple(recorder.resolved_layers),
        n_blocks_in_vit=vit.n_blocks,
    )
    store = ActivationStore.create(
        str(tmp_path / "store"), meta, [f"{i}.png" for i in range(n_imgs)], [0] * n_imgs, ["random"]
    )
    pixels = torch.randn(n_imgs, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    blocks = store.missing_blocks()
    order = block_batches(store.layout, blocks, batch)
    batches = ((pixels[idx], torch.tensor(idx), torch.zeros(len(idx), dtype=torch.long)) for idx in order)

    now = [0.0]

    def clock() -> float:  # a batch costs 1 s at 2 threads and 0.5 s at 1: this machine has one busy core
        now[0] += 1.0 if torch.get_num_threads() >= 2 else 0.5
        return now[0]

    tuner = threads.ThreadTuner(2, clock=clock)
    before = torch.get_num_threads()
    result = record_batches(store, recorder, batches, blocks, "cpu", tuner=tuner)

    assert tuner.n_steps == len(order) == n_imgs // batch
    assert [(src, dst) for _, src, dst in tuner.changes] == [(2, 1)]
    assert torch.get_num_threads() == before
    assert result.n_imgs_written == n_imgs and store.is_complete
    with torch.inference_mode():  # the reference: a plain forward of every image, whatever the threads
        _, expected = recorder(pixels)
    recorded = np.asarray(store.array(-1)[:])
    np.testing.assert_allclose(recorded, expected[:, 0].numpy(), rtol=1e-5, atol=1e-5)
