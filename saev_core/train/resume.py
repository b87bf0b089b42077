"""Resume state: what a sweep group leaves on disk while it trains, so that a killed run continues where it stopped.

Every ``ckpt_every`` steps (before the last) each member writes ``train_state-<step>.pt`` (weights, buffers, Adam
state, step, loader position, schedule values), each atomically, and only then the group pointer
``<ckpt_path>/group-<hash of the member ids>.json`` naming that step is replaced; older state files go after
that. A kill at any moment leaves the pointer naming a step whose files all exist. A rerun of the same command
loads them and continues; the result equals an uninterrupted run's. ``metrics.jsonl`` loses the lines of the steps
that run again, so it reads as one run's log.
"""

import glob
import hashlib
import json
import logging
import math
import os
import re
import time
from typing import TYPE_CHECKING

import torch

from saev_core.errors import UserError
from saev_core.files import atomic_write, atomic_write_json, read_json, remove_if_exists

if TYPE_CHECKING:
    from saev_core.train.trainer import Member

logger = logging.getLogger(__name__)

STATE_RE = re.compile(r"train_state-(\d+)\.pt$")


def pointer_path(ckpt_path: str, folders: dict[str, str]) -> str:
    """The group's resume pointer: one per set of member ids, so a sweep's groups never share one."""
    digest = hashlib.sha256(",".join(sorted(folders)).encode()).hexdigest()[:12]
    return os.path.join(ckpt_path, f"group-{digest}.json")


def save_train_state(group_file: str, members: list["Member"], done: int, n_steps: int, loader_state: dict):
    """Every member's state file first, then the pointer, then the old files: a kill leaves a usable pointer."""
    for m in members:
        state = {
            "member_id": m.id,
            "step": done,
            "n_steps": n_steps,
            "model": m.sae.state_dict(),
            "optimizer": m.optimizer.state_dict(),
            "loader": loader_state,
            "schedule": {"lr": m.optimizer.param_groups[0]["lr"], "sparsity_scale": m.sae.sparsity_scale},
        }
        atomic_write(os.path.join(m.folder, f"train_state-{done}.pt"), lambda f, s=state: torch.save(s, f))
    atomic_write_json(
        group_file, {"step": done, "n_steps": n_steps, "members": [m.id for m in members], "time": time.time()}
    )
    for m in members:
        remove_train_states(m.folder, keep=done)


def remove_train_states(folder: str, keep: int | None = None) -> None:
    """Every ``train_state-<step>.pt`` in ``folder`` but step ``keep``'s."""
    for path in glob.glob(os.path.join(folder, "train_state-*.pt")):
        if int(STATE_RE.search(path).group(1)) != keep:
            remove_if_exists(path)


def load_train_state(group_file: str, members: list["Member"], device: str) -> tuple[int, dict | None]:
    """(first step to run, loader state) from the group pointer; (0, None) when there is nothing to resume.

    A damaged pointer (cut by a crash or edited) falls back to the latest step whose state files every member has;
    a damaged or foreign state file is a UserError naming it and saying how to start over."""
    start_over = (
        f"To train this group from step 0 instead, delete {group_file} and the train_state-*.pt files in "
        f"{', '.join(m.folder for m in members)}, then run the same command again."
    )
    if not os.path.lexists(group_file):
        return 0, None
    step = pointer_step(group_file)
    if step is None:
        step = _latest_common_step(members)
        if step is None:
            raise UserError(
                f"The resume pointer {group_file} is damaged (not JSON with a step) and no step has a "
                f"state file for every SAE of the group. {start_over}"
            )
        logger.warning(
            "The resume pointer %s is damaged; resuming from step %d, the latest step every SAE of the "
            "group has a state file for.",
            group_file,
            step,
        )
    paths = [os.path.join(m.folder, f"train_state-{step}.pt") for m in members]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        logger.warning(
            "Checkpoint %s names step %d but %s is missing; training from the start.", group_file, step, missing[0]
        )
        return 0, None
    loader_state = None
    for m, path in zip(members, paths):
        state = _read_train_state(path, m, step, start_over)
        loader_state = state["loader"]
    return step, loader_state


def pointer_step(group_file: str) -> int | None:
    """The step the group pointer names; None when it is cut short or malformed."""
    try:
        pointer = read_json(group_file)
    except (OSError, ValueError):
        return None
    step = pointer.get("step") if isinstance(pointer, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else None


def _latest_common_step(members: list["Member"]) -> int | None:
    steps = None
    for m in members:
        mine = {int(STATE_RE.search(p).group(1)) for p in glob.glob(os.path.join(m.folder, "train_state-*.pt"))}
        steps = mine if steps is None else steps & mine
    return max(steps) if steps else None


def _read_train_state(path: str, m: "Member", step: int, start_over: str) -> dict:
    """Load member ``m``'s state of ``step`` from ``path`` into its SAE and optimizer; UserError when the file is
    cut short, is not a train state, or belongs to another member or step."""
    import pickle
    import warnings

    def damaged(why: str) -> UserError:
        return UserError(f"The resume state {path} is damaged or foreign ({why}). {start_over}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=m.sae.b_dec.device, weights_only=True)
    except pickle.UnpicklingError:
        raise damaged("not a torch file of plain tensors (one holding other Python objects is never run)") from None
    except Exception as err:
        raise damaged(f"unreadable: {type(err).__name__}") from None
    keys = {"member_id", "step", "model", "optimizer", "loader"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise damaged("not a train state: it lacks " + ", ".join(sorted(keys - set(state or {}))))
    if state["member_id"] != m.id or state["step"] != step:
        raise damaged(f"it is member {state['member_id']!r} at step {state['step']!r}, not {m.id!r} at step {step}")
    try:
        m.sae.load_state_dict(state["model"])
        m.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise damaged(f"its weights do not fit this SAE: {str(err).splitlines()[0]}") from None
    return state


def prepare_log_file(m: "Member", cfg_json: dict, keep_before: int) -> None:
    """config.json, and metrics.jsonl without the lines of steps that will run again (all of them when fresh)."""
    os.makedirs(m.folder, exist_ok=True)
    atomic_write_json(os.path.join(m.folder, "config.json"), cfg_json)
    path = os.path.join(m.folder, "metrics.jsonl")
    kept = []
    if keep_before > 0 and os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if _logged_step(line) < keep_before]
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _logged_step(line: str) -> int | float:
    """The step of a metrics.jsonl line; inf for a line a kill cut short (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
