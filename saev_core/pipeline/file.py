"""The pipeline file: one TOML describing an experiment, parsed into the same config classes the CLI uses.

Tables: ``[activations]`` (with ``[activations.data]``, whose ``kind`` picks the image source), ``[train]`` and
``[sweep]``, ``[visuals]``, ``[report]``, ``[checks]``, ``[automation]``, ``[watch]``, ``[demo]``, ``[probe]``.
Keys are the CLI's field names; every table is read by ``saev_core.tables.from_table`` into a frozen dataclass.
Importing this module imports no torch: Dagster reads the file at every code-server start.
"""

import dataclasses
import importlib.resources
import os
import tomllib

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import check_output_folder, inside
from saev_core.tables import from_table
from saev_core.train import sweep

DATA_KINDS: dict[str, type] = {
    "embedded-dataset": config.EmbeddedDataset,
    "image-folder-dataset": config.ImageFolderDataset,
    "seg-folder-dataset": config.SegFolderDataset,
    "embedded-seg-dataset": config.EmbeddedSegDataset,
}
TABLES = ("activations", "train", "sweep", "visuals", "report", "checks", "automation", "watch", "demo", "probe")
MEMBER_RULES = ("best", "all")


@dataclasses.dataclass(frozen=True)
class VisualsPlan:
    """[visuals]: which sweep members get visuals, and the visuals flags (``--top-k``, ``--log-freq-range``, ...)."""

    members: str = "best"
    """"best": the member with the lowest held-out NMSE among those with L0 <= max_l0; "all": every member."""
    max_l0: float | None = None
    """The "best" rule's L0 bound (None: no bound)."""
    visuals: config.VisualsConfig = dataclasses.field(default_factory=config.VisualsConfig)
    """The flags; ``ckpt`` is each member's checkpoint and the output goes to
    <dump_to>/layer_<layer>/<member_id>/."""

    def folder(self, layer: int, member_id: str | None = None) -> str:
        """<dump_to>/layer_<layer>, or a member's folder in it; a member id that would leave it (``../x``, from a
        hand-edited sweep.csv or members.json) is refused (``files.inside``)."""
        layer_folder = os.path.join(self.visuals.dump_to, f"layer_{layer}")
        return layer_folder if member_id is None else inside(layer_folder, member_id, what="member id")


@dataclasses.dataclass(frozen=True)
class ReportPlan:
    """[report]: the sweep report over every layer."""

    max_l0: float | None = None
    """The chosen member of a layer: lowest held-out NMSE among members with L0 <= max_l0 (None: no bound)."""
    pca: bool = True
    """Draw the PCA baseline (PCA with L0 components, fitted on the training split, NMSE on the held-out split)."""
    random_control: bool = True
    """Add the random-decoder control at each member's L0 and width (``saev_core.analysis.controls``)."""
    kmeans: bool | None = None
    """Add k-means with d_sae centroids (L0 = 1): true or false; unset runs it when it costs about six seconds or
    less (``controls.KMEANS_BUDGET``)."""
    seeds: int = 1
    """2: retrain each layer's chosen member from another initialisation and report how well the two decoders'
    atoms match (Hungarian-matched mean cosine, ``saev_core.analysis.seeds``)."""
    pca_max_vectors: int = 200_000
    """Vectors per split the PCA baseline reads at most (a uniform sample of images beyond that)."""
    splice: bool = False
    """Add splice-in fidelity columns (``saev_core.analysis.splice``: the ViT's final embedding with the layer replaced
    by each member's reconstruction, vs zero ablation): costs four ViT passes over the held-out images plus one per
    member."""
    splice_max_images: int = 256
    """Held-out images the splice-in evaluation runs the ViT on at most (a seeded sample beyond that)."""

    def __post_init__(self) -> None:
        if self.seeds not in (1, 2):
            raise UserError(f"report.seeds = {self.seeds!r}: expected 1 (no retraining) or 2 (one more seed).")


@dataclasses.dataclass(frozen=True)
class ProbePlan:
    """[probe]: patch probes (docs/probes.md) of the chosen members of each layer's sweep; needs a store with
    per-patch labels. Without the table there is no probe stage."""

    members: str = "best"
    """"best": the member with the lowest held-out NMSE among those with L0 <= max_l0; "all": every member."""
    max_l0: float | None = None
    """The "best" rule's L0 bound (None: no bound)."""
    probe: config.ProbeConfig = dataclasses.field(default_factory=config.ProbeConfig)
    """The flags (k, tau, n_bins, controls, device); each member's probe.json goes to <its folder>/probes/."""

    def folder(self, ckpt: str) -> str:
        return os.path.join(os.path.dirname(ckpt), "probes")


@dataclasses.dataclass(frozen=True)
class ChecksPlan:
    """[checks]: the thresholds of the sweep's health check."""

    max_frac_dead: float = 0.5
    """A sweep member with more dead latents than this fails the sweep's check."""
    max_nmse: float | None = None
    """A sweep whose best member's held-out NMSE is above this fails the sweep's check (None: no bound)."""
    min_gain_vs_random: float = config.MIN_GAIN_VS_RANDOM
    """The chosen member must have this much less held-out error than the random-decoder control at its L0 to count
    as having found structure (the report's verdict; a warning of the sweep's check below it)."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_frac_dead <= 1:
            raise UserError(f"checks.max_frac_dead = {self.max_frac_dead!r}: expected a fraction between 0 and 1.")
        if self.max_nmse is not None and not self.max_nmse >= 0:
            raise UserError(f"checks.max_nmse = {self.max_nmse!r}: expected a number >= 0.")


@dataclasses.dataclass(frozen=True)
class AutomationPlan:
    """[automation]: when Dagster looks at the sources."""

    observe_cron: str = "*/5 * * * *"
    """When the sources (ViT checkpoint, images, watched SAE folder) are observed (a cron string)."""


@dataclasses.dataclass(frozen=True)
class WatchPlan:
    """[watch]: the folder where users drop SAE checkpoint files to get their visuals."""

    folder: str | None = None
    """SAE checkpoint files dropped here get visuals (Dagster's dropped_sae_visuals); None: no watched folder."""
    create: bool = False
    """Create a missing folder when the file loads (the demo's, under its own outputs); otherwise a missing folder is
    refused, since a typo there would watch nothing in silence."""


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """[demo]: what only the embedded demo needs."""

    random_vit: bool = False
    """Create random weights at vit_ckpt's local path when the file is missing (no download on our machines)."""


@dataclasses.dataclass(frozen=True)
class Pipeline:
    path: str
    activations: config.ActivationsConfig
    train: config.TrainConfig = dataclasses.field(default_factory=config.TrainConfig)
    """[train]: the base of every layer's sweep (data.shard_root and data.layer are filled in per layer)."""
    sweep: dict = dataclasses.field(default_factory=dict)
    """[sweep]: lists to sweep over, as in `train --sweep` (tables [sweep.sae], [sweep.data], top-level keys)."""
    visuals: VisualsPlan = dataclasses.field(default_factory=VisualsPlan)
    """[visuals]: top-k visuals of the chosen members of each layer's sweep."""
    report: ReportPlan = dataclasses.field(default_factory=ReportPlan)
    """[report]: the sweep report."""
    checks: ChecksPlan = dataclasses.field(default_factory=ChecksPlan)
    automation: AutomationPlan = dataclasses.field(default_factory=AutomationPlan)
    watch: WatchPlan = dataclasses.field(default_factory=WatchPlan)
    demo: DemoPlan = dataclasses.field(default_factory=DemoPlan)
    probe: ProbePlan | None = None
    """[probe]: patch probes of each layer's chosen members (None: no such table, no probe stage)."""
    n_workers_fanout: int = 1
    """[activations] n_workers_fanout: Dagster records the store's blocks in this many parallel ops (one writer per
    block; the bytes are those of one worker). Not part of any output, so not of any code version."""

    def code_version(self, stage: str) -> str:
        """A short hash of the settings that change a stage's output (activations, sae_sweep, topk_visuals,
        sweep_report): editing [sweep] makes sae_sweep and what follows stale, editing [visuals] only topk_visuals.
        Settings that only change speed or logging (device, workers, batch sizes of the ViT, log intervals) are left
        out."""
        acts = dataclasses.replace(self.activations, device="auto", n_workers=0, vit_batch_size=1, dry_run=False)
        train = dataclasses.replace(self.train, device="auto", log_every=1, ckpt_every=1)
        visuals = dataclasses.replace(self.visuals, visuals=dataclasses.replace(self.visuals.visuals, device="auto"))
        parts = {
            "activations": [acts],
            "sae_sweep": [train, sorted(self.sweep.items())],
            "topk_visuals": [visuals],
            "sweep_report": [self.report],
            "probe_metrics": [
                self.probe
                and dataclasses.replace(self.probe, probe=dataclasses.replace(self.probe.probe, device="auto"))
            ],
        }[stage]
        import hashlib

        return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]

    def sweep_for(self, layer: int, store_path: str) -> list[config.TrainConfig]:
        """Every member config of one layer's sweep, trained on that layer of the given store. Checkpoints go to
        <train.ckpt_path>/layer_<layer>/<member_id>."""
        base = dataclasses.replace(
            self.train,
            data=dataclasses.replace(self.train.data, shard_root=store_path, layer=layer),
            ckpt_path=os.path.join(self.train.ckpt_path, f"layer_{layer}"),
        )
        return sweep.grid(base, self.sweep, source=f"[sweep] of {self.path}")

    def activations_for(self, layers: tuple[int, ...], **overrides) -> config.ActivationsConfig:
        """The [activations] config restricted to some of its layers (one Dagster run records the selected
        partitions), with run-time overrides."""
        unknown = [layer for layer in layers if layer not in self.activations.vit_layers]
        if unknown:
            raise UserError(
                f"Layers {unknown} are not in {self.path}'s vit_layers {list(self.activations.vit_layers)}. "
                "Add them to [activations] vit_layers, or pick partitions among those layers."
            )
        return dataclasses.replace(self.activations, vit_layers=tuple(layers), **overrides)

    def checkpoint_fingerprint(self) -> str:
        """Content fingerprint of the ViT checkpoint (part of the store key; a Dagster source's data version)."""
        from saev_core.record import vit

        return vit.checkpoint_fingerprint(self.activations.vit_family, self.activations.vit_ckpt)

    def image_source(self):
        """The images the pipeline records (listed, not decoded)."""
        from saev_core.record import images

        return images.make_image_source(self.activations.data, None, self.activations.n_imgs)

    def checkpoint_file(self) -> str | None:
        """The ViT checkpoint's local file (absolute), or None when it is a pretrained tag."""
        from saev_core.record import checkpoints

        return checkpoints.parse_ckpt(self.activations.vit_family, self.activations.vit_ckpt, must_exist=False).path


def embedded_demo_path() -> str:
    return str(importlib.resources.files("saev_core.pipeline") / "demo.toml")


def default_pipeline_path() -> str:
    return os.environ.get("SAEV_PIPELINE") or embedded_demo_path()


def _resolve_paths(pipe: Pipeline, base: str) -> Pipeline:
    """Every relative local path of the pipeline made absolute against ``base`` (URLs unchanged)."""
    from saev_core.files import is_url
    from saev_core.record import checkpoints

    def at(p: str | None) -> str | None:
        return p if p is None or p == "" or is_url(p) or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    acts = pipe.activations
    data = acts.data
    if isinstance(data, (config.ImageFolderDataset, config.SegFolderDataset)):
        data = dataclasses.replace(data, root=at(data.root))
    elif data.cache_dir:
        data = dataclasses.replace(data, cache_dir=at(data.cache_dir))
    ckpt = acts.vit_ckpt
    arch, _, rest = ckpt.partition("/")
    try:
        local = checkpoints.parse_ckpt(acts.vit_family, ckpt, must_exist=False).path is not None
    except UserError:
        local = False  # check_inputs reports it
    if local and not os.path.isabs(os.path.expanduser(rest)):
        ckpt = f"{arch}/{at(rest)}"
    acts = dataclasses.replace(acts, data=data, vit_ckpt=ckpt, dump_to=at(acts.dump_to))
    vis = pipe.visuals.visuals
    vis = dataclasses.replace(
        vis, dump_to=at(vis.dump_to), data=dataclasses.replace(vis.data, shard_root=at(vis.data.shard_root))
    )
    return dataclasses.replace(
        pipe,
        activations=acts,
        train=dataclasses.replace(pipe.train, ckpt_path=at(pipe.train.ckpt_path)),
        visuals=dataclasses.replace(pipe.visuals, visuals=vis),
        watch=dataclasses.replace(pipe.watch, folder=at(pipe.watch.folder)),
    )


def check_inputs(pipe: Pipeline) -> None:
    """What can be checked without building the model: the checkpoint file exists (or [demo] random_vit makes it),
    the image folder exists, and the layers exist in the architecture (when its config says how many blocks)."""
    from saev_core.record import checkpoints

    acts = pipe.activations
    ref = checkpoints.parse_ckpt(acts.vit_family, acts.vit_ckpt, must_exist=False)
    if ref.path is not None and not os.path.isfile(ref.path) and not pipe.demo.random_vit:
        raise UserError(
            f"activations.vit_ckpt = {acts.vit_ckpt!r} in {pipe.path}: no file at {ref.path}. Fix the "
            "path, or set [demo] random_vit = true to create random weights there."
        )
    if isinstance(acts.data, (config.ImageFolderDataset, config.SegFolderDataset)) and not os.path.isdir(
        acts.data.root
    ):
        raise UserError(
            f"activations.data.root = {acts.data.root!r} in {pipe.path} is not a folder; point it at the images."
        )
    if pipe.watch.folder is not None and not os.path.isdir(pipe.watch.folder):
        if pipe.watch.create and not os.path.exists(pipe.watch.folder):
            os.makedirs(pipe.watch.folder, exist_ok=True)
        else:
            raise UserError(
                f"watch.folder = {pipe.watch.folder!r} in {pipe.path} is not a folder: create it (mkdir -p "
                f"{pipe.watch.folder}), set [watch] create = true, or remove [watch] folder."
            )
    n_blocks = checkpoints.known_n_blocks(acts.vit_family, ref.arch)
    bad = [layer for layer in acts.vit_layers if n_blocks is not None and not -n_blocks <= layer < n_blocks]
    if bad:
        raise UserError(
            f"activations.vit_layers = {list(acts.vit_layers)} in {pipe.path}: {bad} out of range for "
            f"{ref.arch}, which has {n_blocks} blocks ({-n_blocks}..{n_blocks - 1})."
        )


def load_pipeline(path: str | None = None) -> Pipeline:
    """Parse a pipeline file (None: $SAEV_PIPELINE, else the embedded demo). Unknown keys and wrong types raise
    a UserError naming the key and the file."""
    path = path or default_pipeline_path()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise UserError(
            f"Cannot read pipeline file {path!r}: {err}. Set $SAEV_PIPELINE or pass a valid path."
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"Pipeline file {path!r} is not valid TOML: {err}.") from None
    for table in doc:
        if table not in TABLES:
            raise UserError(f"Unknown table [{table}] in {path}; allowed: {', '.join(TABLES)}.")
        if not isinstance(doc[table], dict):
            raise UserError(f"{table} = {doc[table]!r} in {path}: [{table}] must be a table (a [{table}] header).")
    if "activations" not in doc:
        raise UserError(
            f"{path} has no [activations] table: every pipeline file says what to record (vit_family, vit_ckpt, "
            "vit_layers, [activations.data]); without it the defaults would record ViT-L-14/openai on the embedded "
            "images. Add the table (the embedded demo, saev_core/pipeline/demo.toml, is an example)."
        )
    acts_table = dict(doc.get("activations", {}))
    n_workers_fanout = _fanout(acts_table.pop("n_workers_fanout", 1), path)
    data_table = dict(acts_table.pop("data", {"kind": "embedded-dataset"}))
    kind = data_table.pop("kind", None)
    if kind not in DATA_KINDS:
        raise UserError(
            f"[activations.data] kind = {kind!r} in {path}: expected one of {', '.join(map(repr, DATA_KINDS))}."
        )
    data = from_table(DATA_KINDS[kind](), data_table, "activations.data", path)
    activations = from_table(config.ActivationsConfig(data=data), acts_table, "activations", path)
    if "sweep" in doc.get("train", {}):
        raise UserError(
            f"train.sweep in {path}: a pipeline file sweeps with its own [sweep] table; move the lists "
            "there and remove train.sweep."
        )
    train = from_table(config.TrainConfig(), doc.get("train", {}), "train", path)
    pipe = Pipeline(
        path=path,
        activations=activations,
        train=train,
        sweep=doc.get("sweep", {}),
        visuals=_visuals_plan(doc.get("visuals", {}), path),
        report=from_table(ReportPlan(), doc.get("report", {}), "report", path),
        checks=from_table(ChecksPlan(), doc.get("checks", {}), "checks", path),
        automation=from_table(AutomationPlan(), doc.get("automation", {}), "automation", path),
        watch=from_table(WatchPlan(), doc.get("watch", {}), "watch", path),
        demo=from_table(DemoPlan(), doc.get("demo", {}), "demo", path),
        probe=_probe_plan(doc["probe"], path) if "probe" in doc else None,
        n_workers_fanout=n_workers_fanout,
    )
    if not activations.vit_layers:
        raise UserError(f"[activations] vit_layers in {path} is empty; list the layers to record, e.g. [-2].")
    # Relative paths are relative to the file's own folder (the code server, the run worker and the CLI may each
    # start elsewhere); the embedded demo keeps writing under the folder the user runs from.
    base = (
        os.getcwd()
        if os.path.abspath(path) == os.path.abspath(embedded_demo_path())
        else os.path.dirname(os.path.abspath(path))
    )
    check_cron(pipe.automation.observe_cron, f"automation.observe_cron in {path}")
    pipe = _resolve_paths(pipe, base)
    check_inputs(pipe)
    pipe.sweep_for(activations.vit_layers[0], "<store>")  # check the [sweep] table now, not at training time
    return pipe


# The five fields of a cron string Dagster accepts (minute hour day-of-month month day-of-week), their ranges and
# names; and the @-shortcuts. tests/dagster checks this agrees with Dagster's own parser on good and bad strings.
_CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_SHORTCUTS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def check_cron(text, where: str) -> None:
    """A UserError naming ``where`` (the file and key) when ``text`` is not a five-field cron string: read when the
    file loads, so Dagster's load fails with one line rather than a traceback inside the sensor's definition."""

    def problem() -> str | None:
        if not isinstance(text, str):
            return "not a string"
        if text.strip().lower() in _CRON_SHORTCUTS:
            return None
        fields = text.split()
        if len(fields) != 5:
            return f"{len(fields)} fields where cron has 5 (minute hour day-of-month month day-of-week)"
        for field, (name, low, high, names) in zip(fields, _CRON_FIELDS):
            for item in field.split(","):
                span, _, step = item.partition("/")
                if step and not (step.isdigit() and int(step) >= 1):
                    return f"the {name} field {field!r} has a bad step {step!r}"
                if span == "*":
                    continue
                ends = span.split("-")
                values = [_cron_value(e.lower(), low, names) for e in ends]
                if len(ends) > 2 or None in values or any(not low <= v <= high for v in values):
                    return f"the {name} field {field!r} is not a value, range or list in {low}..{high}"
        if fields[3].lower() in ("2", "feb") and fields[2] in ("30", "31"):
            return f"February has no day {fields[2]}"
        return None

    why = problem()
    if why is not None:
        raise UserError(
            f'{where}: {text!r} is not a cron string ({why}). Write five fields, e.g. "*/5 * * * *" (every five '
            "minutes), or @hourly / @daily."
        )


def _cron_value(text: str, low: int, names: tuple[str, ...]) -> int | None:
    if text.isdigit():
        return int(text)
    return names.index(text) + low if text in names else None


def _visuals_plan(table: dict, source: str) -> VisualsPlan:
    table = dict(table)
    # probe: each member's own probe.json, beside its checkpoint
    members, max_l0 = _member_rule(table, "visuals", source, per_member=("ckpt", "images", "probe"))
    return VisualsPlan(members, max_l0, from_table(config.VisualsConfig(), table, "visuals", source))


def _probe_plan(table: dict, source: str) -> ProbePlan:
    table = dict(table)
    members, max_l0 = _member_rule(table, "probe", source, per_member=("ckpt", "dump_to", "data"))
    return ProbePlan(members, max_l0, from_table(config.ProbeConfig(), table, "probe", source))


def _member_rule(table: dict, section: str, source: str, per_member: tuple[str, ...]) -> tuple[str, float | None]:
    """The [visuals] or [probe] table's choice of members (``members``, ``max_l0``), popped from ``table`` and
    checked; the keys the pipeline sets per member (``per_member``) are refused."""
    members = table.pop("members", "best")
    if members not in MEMBER_RULES:
        raise UserError(
            f"{section}.members = {members!r} in {source}: expected one of {', '.join(map(repr, MEMBER_RULES))}."
        )
    max_l0 = table.pop("max_l0", None)
    if max_l0 is not None and (not isinstance(max_l0, (int, float)) or isinstance(max_l0, bool) or max_l0 < 0):
        raise UserError(
            f"{section}.max_l0 = {max_l0!r} in {source}: expected a number >= 0 (the best member's L0 bound)."
        )
    for key in per_member:
        if key in table:
            raise UserError(f"{section}.{key} in {source} is set per member by the pipeline; remove it.")
    return members, None if max_l0 is None else float(max_l0)


def _fanout(value, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"activations.n_workers_fanout = {value!r} in {source}: expected a whole number >= 1 "
            "(the parallel recording ops of one Dagster run; 1 records in one op)."
        )
    return value


def check_outputs(pipe: Pipeline) -> None:
    """Before a run: every output folder of the pipeline can be written (UserError naming the key otherwise)."""
    from saev_core.record import checkpoints

    check_output_folder(pipe.activations.dump_to, f"[activations] dump_to in {pipe.path}:")
    check_output_folder(pipe.train.ckpt_path, f"[train] ckpt_path in {pipe.path}:")
    check_output_folder(pipe.visuals.visuals.dump_to, f"[visuals] dump_to in {pipe.path}:")
    ref = checkpoints.parse_ckpt(pipe.activations.vit_family, pipe.activations.vit_ckpt, must_exist=False)
    if pipe.demo.random_vit and ref.path is not None and not os.path.exists(ref.path):
        check_output_folder(os.path.dirname(ref.path), f"[demo] random_vit: the folder of vit_ckpt in {pipe.path}:")
