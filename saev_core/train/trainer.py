"""Train a sweep of SAEs: every group of configs that can share a data pass trains in ONE pass over the store.

``split_cfgs`` groups the configs; each group gets one ``ActivationLoader`` and every batch goes to the device
once and then through each member in turn. Members share nothing but that batch (own weights, own Adam, own
schedule, no shared random state), so training K SAEs together gives the weights each would get alone.

Settings left unset that depend on the SAE and the run's length (``lr``, ``n_lr_warmup``,
``sae.dead_after_n_patches``) are fitted to the run first (``fitting.fit_to_run``); what was chosen, and any
explicit setting that does not fit the run, is reported once, in the log and through ``on_note``, for the members
that train (a finished member is read back and gets no note). Training uses ``n_threads`` CPU threads, or (unset)
the count the steps' own timing picks (``saev_core.threads``).

Per member and step: lr = ``lr_at(step)`` (linear warm-up over ``n_lr_warmup`` steps, then linear decay that
reaches 0 just after the last step), ``sae.sparsity_scale = min(1, step / n_sparsity_warmup)``, backward,
``before_optimizer_step()``, gradient clipping to ``max_grad_norm`` (off when <= 0), Adam step,
``after_optimizer_step()``. Steps = ``n_patches // sae_batch_size``; epochs cycle and an epoch's short last batch
is skipped, so every step sees a full batch.

Files, per member ``<ckpt_path>/<member_id>/``: ``config.json``, ``metrics.jsonl`` (one line per log step),
``train_state-<step>.pt`` while training, and when done ``sae.pt``, ``latent_stats.npz`` (firing frequency and
mean value per latent on held-out data) and ``metrics.json`` (held-out metrics and the training-stream dead count;
written last: its presence with ``sae.pt`` marks the member finished, and a rerun skips it).
``<ckpt_path>/sweep.csv`` has one row per member.

Resume (``resume``): every ``ckpt_every`` steps the group's state goes to disk, so a rerun of the same command after
a kill continues from there and ends with an uninterrupted run's weights.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saev_core import config, nn, threads
from saev_core.errors import UserError
from saev_core.files import check_output_folder, remove_if_exists
from saev_core.nn import sparse_topk
from saev_core.nn.metrics import ReconstructionMetrics
from saev_core.store import ActivationStore
from saev_core.store.loader import ActivationLoader
from saev_core.store.stats import normalization
from saev_core.train import results, resume
from saev_core.train.fitting import fit_to_run
from saev_core.train.sweep import grid, load_sweep, member_id, split_cfgs

logger = logging.getLogger(__name__)

CALIBRATION_VECTORS = 32_768
"""Training vectors that set a BatchTopK member's inference threshold (``calibrate_thresholds``)."""

OnLog = Callable[[int, str, dict], None]
"""``on_log(step, member_id, record)``: called at every log step of every member with its metrics.jsonl record."""
OnNote = Callable[[str], None]
"""``on_note(message)``: called once per setting the run chose (``fit_to_run``) or that does not fit the run."""


@dataclasses.dataclass
class Member:
    """One SAE of a group while it trains: what the loop steps and what ``resume`` saves and restores."""

    cfg: config.TrainConfig
    id: str
    folder: str
    sae: nn.SparseAutoencoder
    optimizer: torch.optim.Optimizer


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def train_main(cfg: config.TrainConfig) -> list[results.MemberResult]:
    """The ``train`` command: one SAE, or the grid that ``cfg.sweep`` (a TOML file) expands to around ``cfg``."""
    cfgs = grid(cfg, load_sweep(cfg.sweep), source=cfg.sweep) if cfg.sweep else [cfg]
    return train_sweep(cfgs)


def train_sweep(
    cfgs: list[config.TrainConfig],
    show_progress: bool = True,
    on_log: OnLog | None = None,
    on_note: OnNote | None = None,
) -> list[results.MemberResult]:
    """Train every config, one data pass per group; returns one result per config, in input order.

    Unset settings are fitted to each config's run first (``fit_to_run``); each distinct note of a member that will
    train goes to the log (a warning) and to ``on_note``, once. A finished member is read back, not trained, so a
    rerun over a finished sweep says nothing about settings it does not use."""
    for folder in dict.fromkeys(c.ckpt_path for c in cfgs):
        check_output_folder(folder, "--ckpt-path")
    fitted = [fit_to_run(c) for c in cfgs]
    cfgs = [c for c, _ in fitted]
    training = [notes for c, notes in fitted if not results.is_finished(os.path.join(c.ckpt_path, member_id(c)))]
    for note in dict.fromkeys(note for notes in training for note in notes):
        logger.warning(note)
        if on_note is not None:
            on_note(note)
    by_id: dict[str, results.MemberResult] = {}
    groups = split_cfgs(cfgs)
    for i, group in enumerate(groups):
        unique = list({member_id(c): c for c in group}.values())  # identical configs train once
        desc = f"group {i + 1}/{len(groups)} ({len(unique)} SAEs)"
        for result in train_group(unique, show_progress=show_progress, on_log=on_log, desc=desc):
            by_id[result.member_id] = result
    done = [by_id[member_id(c)] for c in cfgs]
    for folder in dict.fromkeys(c.ckpt_path for c in cfgs):
        results.write_sweep_csv([r for r in done if r.cfg.ckpt_path == folder], results.sweep_csv_path(folder))
    return done


def train_group(
    cfgs: list[config.TrainConfig], show_progress: bool = True, on_log: OnLog | None = None, desc: str = ""
) -> list[results.MemberResult]:
    """Train configs that share every data-pass field in one pass; finished members are read back, not retrained."""
    cfgs = [fit_to_run(c)[0] for c in cfgs]  # train_sweep has fitted and reported them already; a no-op then
    base = cfgs[0]
    store = ActivationStore.open(base.data.shard_root)
    store.array(base.data.layer)  # a missing layer: the store's UserError
    for cfg in cfgs:
        if cfg.sae.d_vit != store.d_vit:
            raise UserError(
                f"--sae.d-vit {cfg.sae.d_vit} does not match the store's d_vit {store.d_vit} ({store.path}); "
                f"pass --sae.d-vit {store.d_vit}."
            )
    if base.sae_batch_size < 1:
        raise UserError(f"--sae-batch-size {base.sae_batch_size} must be at least 1.")
    n_steps = base.n_patches // base.sae_batch_size
    if n_steps < 1:
        raise UserError(
            f"--n-patches {base.n_patches} is less than one batch (--sae-batch-size {base.sae_batch_size}): "
            "nothing to train. Raise --n-patches or lower --sae-batch-size."
        )
    folders = {member_id(c): os.path.join(base.ckpt_path, member_id(c)) for c in cfgs}
    todo = [c for c in cfgs if not results.is_finished(folders[member_id(c)])]
    for c in cfgs:
        if c not in todo:
            logger.info("%s is already trained (%s); not training it again.", member_id(c), folders[member_id(c)])
    if todo:
        _train_members(todo, store, n_steps, show_progress, on_log, desc, resume.pointer_path(base.ckpt_path, folders))
    return [results.read_result(c, folders[member_id(c)]) for c in cfgs]


# ----------------------------------------------------------------------------------------------------------------
# Training one group
# ----------------------------------------------------------------------------------------------------------------


def training_bytes(cfgs: list[config.TrainConfig]) -> int:
    """A lower bound of what training ``cfgs`` together allocates: per member 16 bytes per parameter (weights,
    gradients, Adam's two moments) and one batch of latents ([sae_batch_size, d_sae] float32, which even the sparse
    top-k path computes before choosing)."""
    total = 0
    for c in cfgs:
        d_vit, d_sae = c.sae.d_vit, c.sae.d_vit * c.sae.exp_factor
        total += 16 * (2 * d_vit * d_sae + d_sae + d_vit) + 4 * c.sae_batch_size * d_sae
    return total


def check_training_memory(cfgs: list[config.TrainConfig], device: str) -> None:
    """Refuse before any SAE is built when the group cannot fit in ``device``'s free memory (the estimate in the
    message)."""
    widths = sorted({c.sae.d_vit * c.sae.exp_factor for c in cfgs})
    config.check_memory(
        training_bytes(cfgs),
        device,
        f"{len(cfgs)} SAE(s) of width {', '.join(map(str, widths))} (--sae.d-vit x --sae.exp-factor) with "
        f"--sae-batch-size {cfgs[0].sae_batch_size} (16 bytes per parameter for weights, gradients and Adam, plus "
        "one batch of latents)",
        "Lower --sae.exp-factor or --sae-batch-size, or train fewer members at once.",
    )


def _train_members(
    cfgs: list[config.TrainConfig],
    store: ActivationStore,
    n_steps: int,
    show_progress: bool,
    on_log: OnLog | None,
    desc: str,
    group_file: str,
) -> None:
    base = cfgs[0]
    device = config.resolve_device(base.device)
    tuner = threads.tuner_for(base.n_threads, device)
    n_read = min(2, tuner.n_max)
    train_loader = ActivationLoader(
        store, base.data, base.sae_batch_size, base.seed, "train", n_read_threads=n_read, pin_memory=device == "cuda"
    )
    val_loader = ActivationLoader(store, base.data, base.sae_batch_size, base.seed, "val", n_read_threads=n_read)
    if train_loader.n_vectors < base.sae_batch_size:
        raise UserError(
            f"The training split of {store.path} has {train_loader.n_vectors} vectors, fewer than one batch "
            f"(--sae-batch-size {base.sae_batch_size}). Lower --sae-batch-size or record more images."
        )
    check_training_memory(cfgs, device)
    mean, scale, b_dec = _normalization(store, base.data)
    members = [_make_member(c, mean, scale, b_dec, device) for c in cfgs]
    start, loader_state = resume.load_train_state(group_file, members, device)
    if loader_state is not None:
        train_loader.load_state_dict(loader_state)
        logger.info("Resuming %d SAEs from step %d of %d (%s).", len(members), start, n_steps, group_file)
    for m in members:
        resume.prepare_log_file(m, cfg_json=dataclasses.asdict(m.cfg), keep_before=start)

    def save(done: int) -> None:
        resume.save_train_state(group_file, members, done, n_steps, train_loader.state_dict())

    logger.info("Training %d SAEs for %d steps with %s.", len(members), n_steps - start, threads.describe(tuner))
    progress = _progress(show_progress, desc, n_steps, start, base.sae_batch_size)
    with threads.apply(tuner):
        with contextlib.closing(_full_batches(train_loader, base.sae_batch_size)) as batches, progress:
            _run_steps(members, batches, start, n_steps, device, progress, on_log, save, group_file, store, tuner)
        tuner.settle()
        sample = functools.partial(
            ActivationLoader, store, base.data, base.sae_batch_size, base.seed, "train", n_read_threads=n_read
        )
        calibrated = calibrate_thresholds(members, sample, device)
        heldout = evaluate([m.sae for m in members], val_loader, device)
    provenance = results.provenance(store, base, n_steps)
    for m, result in zip(members, heldout):
        extra = {**training_dead_counts(m.sae), **calibrated.get(m.id, {})}
        results.write_member(m.folder, m.sae, {**result, **extra}, {**provenance, "member_id": m.id})
    remove_if_exists(group_file)


def _run_steps(
    members: list[Member],
    batches: Iterator[Tensor],
    start: int,
    n_steps: int,
    device: str,
    progress,
    on_log: OnLog | None,
    save: Callable[[int], None],
    group_file: str,
    store: ActivationStore,
    tuner: threads.ThreadTuner,
) -> None:
    """The hot loop: each batch goes to the device once and through every member; logs, NaN checks, checkpoints;
    ``tuner`` times each step (and may change torch's thread count for the next)."""
    ckpt_every = max(1, min(m.cfg.ckpt_every for m in members))
    first_bad = torch.full((len(members) + 1,), -1, dtype=torch.long, device=device)  # members..., data
    largest = torch.zeros((), device=device)  # the largest finite |x| so far: huge data is named, not the lr
    t_last, n_since = time.perf_counter(), 0
    for step in range(start, n_steps):
        x: Float[Tensor, "batch d_vit"] = next(batches).to(device, non_blocking=True)
        logging_now = [step % max(1, m.cfg.log_every) == 0 or step == n_steps - 1 for m in members]
        stats = [train_step(m, x, step, n_steps, want) for m, want in zip(members, logging_now)]
        first_bad = _track_nonfinite(first_bad, step, x, [s["loss"] for s in stats])
        largest = torch.maximum(largest, torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0).amax())
        n_since += len(x)
        progress.update(len(x))
        done = step + 1
        ckpt_now = done % ckpt_every == 0 and done < n_steps  # after the last step come the final files
        if any(logging_now) or ckpt_now:
            _raise_if_nonfinite(first_bad, members, group_file, store, largest)
            rate, t_last, n_since = n_since / max(time.perf_counter() - t_last, 1e-9), time.perf_counter(), 0
            for m, s, want in zip(members, stats, logging_now):
                if want:
                    _log(m, step, s, rate, on_log)
            if logging_now[0]:
                progress.set_postfix(loss=f"{stats[0]['loss'].item():.4g}", refresh=False)
        if ckpt_now:
            save(done)
        tuner.step_done()


def train_step(
    m: Member, x: Float[Tensor, "batch d_vit"], step: int, n_steps: int, with_stats: bool = False
) -> dict[str, Tensor]:
    """One optimiser step of one SAE; returns detached scalars: loss parts (and l0, l1 when ``with_stats``)."""
    lr = lr_at(step, m.cfg.lr, m.cfg.n_lr_warmup, n_steps)
    for group in m.optimizer.param_groups:
        group["lr"] = lr
    m.sae.sparsity_scale = sparsity_scale_at(step, m.cfg.n_sparsity_warmup)
    _, f_x, loss = m.sae(x)
    loss.total.backward()
    m.sae.before_optimizer_step()
    if m.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(m.sae.parameters(), m.cfg.max_grad_norm)
    m.optimizer.step()
    m.sae.after_optimizer_step()
    m.optimizer.zero_grad(set_to_none=True)
    out = {
        "loss": loss.total.detach(),
        "mse": loss.mse.detach(),
        "sparsity": loss.sparsity.detach(),
        "aux": loss.aux.detach(),
    }
    if with_stats:
        f_x = f_x.detach()
        out["l0"] = (f_x != 0).sum(dim=-1).float().mean()
        out["l1"] = f_x.abs().sum(dim=-1).mean()
    return out


def lr_at(step: int, peak: float, n_warmup: int, n_steps: int) -> float:
    """Learning rate of 0-based ``step``: peak * (step + 1) / n_warmup while warming up, then linear decay
    peak * (n_steps - step) / (n_steps - n_warmup), which would reach 0 at step n_steps (one past the last)."""
    if step < n_warmup:
        return peak * (step + 1) / n_warmup
    return peak * (n_steps - step) / max(1, n_steps - n_warmup)


def sparsity_scale_at(step: int, n_warmup: int) -> float:
    """Sparsity-coefficient warm-up factor: min(1, step / n_warmup); 1 without warm-up."""
    return 1.0 if n_warmup <= 0 else min(1.0, step / n_warmup)


@torch.no_grad()
def calibrate_thresholds(
    members: list[Member], make_loader: Callable[[], ActivationLoader], device: str
) -> dict[str, dict]:
    """BatchTopK members get their inference threshold from the first ``CALIBRATION_VECTORS`` vectors of the
    training stream (epoch 0, the run's seed: the same sample on a rerun or a resume); returns, per member id, the
    threshold and the training-mode L0 for its metrics.json. Other members are left as they are."""
    todo = [m for m in members if isinstance(m.sae, nn.BatchTopKSAE)]
    if not todo:
        return {}
    loader = make_loader()
    n_batches = max(1, CALIBRATION_VECTORS // loader.batch_size)
    batches = [b.to(device) for b in loader.first_batches(n_batches)]
    return {m.id: m.sae.calibrate_threshold(batches) for m in todo}


def evaluate(saes: list[nn.SparseAutoencoder], val_loader: ActivationLoader, device: str) -> list[dict]:
    """One pass over the held-out split, every batch through every SAE (eval mode); metrics in raw space.

    The dead count of this pass is named ``n_dead_heldout`` / ``frac_dead_heldout``: latents that never fired on
    the held-out vectors (a rare latent can be missing from a small held-out split and still be alive)."""
    accs = [ReconstructionMetrics() for _ in saes]
    for sae in saes:
        sae.eval()
    for x in val_loader:
        x = x.to(device, non_blocking=True)
        if not bool(torch.isfinite(x).all()):
            store = val_loader.store
            raise UserError(
                f"The held-out activations of {store.path} (layer {val_loader.data_cfg.layer}) contain NaN or Inf, "
                "so every SAE's held-out metrics would be NaN; nothing was written as finished (the last training "
                "checkpoint is kept). Record the layer again (check the ViT checkpoint and --dtype)."
            )
        for sae, acc in zip(saes, accs):
            f_x = sae.encode(x)
            acc.update(x, sae.decode(f_x), f_x)
    metrics = []
    for acc in accs:
        out = acc.compute()
        out["n_dead_heldout"], out["frac_dead_heldout"] = out.pop("n_dead"), out.pop("frac_dead")
        metrics.append(out)
    return metrics


def training_dead_counts(sae: nn.SparseAutoencoder) -> dict:
    """Latents that did not fire in the last ``dead_after_n_patches`` training vectors (the SAE's counters):
    ``n_dead_train``, ``frac_dead_train`` (also under its old name ``frac_dead``) and ``dead_window``."""
    n_dead = int(sae.dead_latents().sum())
    frac = n_dead / sae.cfg.d_sae
    return {
        "n_dead_train": n_dead,
        "frac_dead_train": frac,
        "frac_dead": frac,
        "dead_window": int(sae.dead_after_n_patches),
    }


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the group pass
# ----------------------------------------------------------------------------------------------------------------


def _normalization(store: ActivationStore, data: config.DataLoadConfig) -> tuple[np.ndarray, float, np.ndarray]:
    """(mean, scale) for the SAE, and the data mean in normalised space (b_dec's start: 0 when scale_mean)."""
    mean, scale = normalization(store, data)
    if data.scale_mean:
        return mean, scale, np.zeros(store.d_vit)
    raw_mean, _ = normalization(store, dataclasses.replace(data, scale_mean=True, scale_norm=True))  # cached
    return mean, scale, raw_mean * scale


def _make_member(cfg: config.TrainConfig, mean: np.ndarray, scale: float, b_dec: np.ndarray, device: str) -> Member:
    sae = nn.make_sae(cfg.sae)  # initialised on the CPU from cfg.sae.seed alone
    sae.sparse_training = sparse_topk.use_sparse(cfg.sparse_topk, cfg.sae)
    sae.set_normalization(torch.from_numpy(mean), scale)
    sae.init_b_dec(torch.from_numpy(b_dec))
    sae = sae.to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    mid = member_id(cfg)
    return Member(cfg, mid, os.path.join(cfg.ckpt_path, mid), sae, optimizer)


def _full_batches(loader: ActivationLoader, batch_size: int) -> Iterator[Tensor]:
    """Full batches, epoch after epoch (each epoch's short last batch is skipped)."""
    while True:
        it = iter(loader)
        try:
            for x in it:
                if len(x) == batch_size:
                    yield x
        finally:
            it.close()


def _track_nonfinite(first_bad: Tensor, step: int, x: Tensor, losses: list[Tensor]) -> Tensor:
    """Record ``step`` as the first non-finite step of each member (and of the data); no device sync."""
    bad = torch.stack([*(~torch.isfinite(loss) for loss in losses), ~torch.isfinite(x).all()])
    return torch.where((first_bad < 0) & bad, step, first_bad)


HUGE_ACTIVATION = 1e15
"""A finite activation above this is the data's fault when a loss turns non-finite: ViT activations are O(1) to
O(1e3), and a float32 square summed over a few thousand dimensions overflows not far above it (3.4e38)."""


def _raise_if_nonfinite(
    first_bad: Tensor, members: list[Member], group_file: str, store: ActivationStore, largest: Tensor
):
    steps = first_bad.tolist()
    if max(steps) < 0:
        return
    kept = resume.pointer_step(group_file)
    where = (
        f"the last good checkpoint is kept: {group_file} (step {kept}; member files <member>/train_state-{kept}.pt)"
        if kept
        else "no checkpoint had been written yet"
    )
    data_step = steps[-1]
    if data_step >= 0 and data_step <= min((s for s in steps[:-1] if s >= 0), default=data_step):
        raise UserError(
            f"The activations of step {data_step} contain NaN or Inf ({store.path}, layer "
            f"{members[0].cfg.data.layer}); every SAE of the group ({', '.join(m.id for m in members)}) stopped "
            f"there, and {where}. Record the layer again (check the ViT checkpoint and --dtype)."
        )
    i = min((s, i) for i, s in enumerate(steps[:-1]) if s >= 0)[1]
    m = members[i]
    biggest = float(largest)
    if biggest > HUGE_ACTIVATION:
        raise UserError(
            f"The activations hold huge values (|x| up to {biggest:.3g} in the batches read; ViT activations are "
            f"O(1) to O(1e3)) in {store.path}, layer {m.cfg.data.layer}: SAE {m.id}'s loss overflowed to NaN or Inf "
            f"at step {steps[i]} because of the data, not the learning rate; training stopped and {where}. Record "
            "the layer again (check the ViT checkpoint and --dtype) or remove the images that produce them."
        )
    raise UserError(
        f"SAE {m.id} ({m.cfg.sae.arch}, d_sae={m.cfg.sae.d_sae}, lr={m.cfg.lr:g}) got a non-finite loss at step "
        f"{steps[i]}; training stopped and {where}. Lower --lr, raise --n-lr-warmup or lower --max-grad-norm."
    )


def _log(m: Member, step: int, stats: dict[str, Tensor], patches_per_s: float, on_log: OnLog | None) -> None:
    record = {
        "step": step,
        "lr": m.optimizer.param_groups[0]["lr"],
        "sparsity_scale": m.sae.sparsity_scale,
        **{k: float(v) for k, v in stats.items()},
        "patches_per_s": patches_per_s,
    }
    with open(os.path.join(m.folder, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if on_log is not None:
        on_log(step, m.id, record)


def _progress(show: bool, desc: str, n_steps: int, start: int, batch_size: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=n_steps * batch_size,
        initial=start * batch_size,
        unit="patch",
        unit_scale=True,
        desc=desc or "train",
        disable=not show,
        dynamic_ncols=True,
    )
