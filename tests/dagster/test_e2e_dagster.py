"""End to end against the real webserver: `dagster dev -w workspace.yaml` on 127.0.0.1 with its own DAGSTER_HOME,
driven over GraphQL as the UI drives it, and the UI itself in headless Chromium.

One flow, bounded (6 minutes at most, every wait a short poll under one deadline): the lineage; a backfill of
`activations` over every layer is exactly one run; the automation trains the sweeps it makes stale; new weights
in the checkpoint file make the automation record the activations again (the observation cron is every minute
here); the asset page of `sae_sweep` shows the L0-vs-NMSE plot. Every process started here is stopped by its
process group, and the test checks that none is left."""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from saev_core.store import ActivationStore
from tests.browser import CHROMIUM, Chromium
from tests.helpers import dagster_dev_argv, tiny_pipeline_text, write_images
from tests.processes import free_port

LAYERS = [0, -1]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every wait of the flow together. With the set-up (~15 s) and the stop (~10 s) it stays within the
# issue's 6 minutes; the flow takes 3-4 minutes on 2 busy cores, most of it the daemons' 30-s loops and the cron.
BUDGET_S = 330

ASSET_GRAPH = """{
  assetNodes {
    assetKey { path }
    dependencyKeys { path }
    partitionKeys
    backfillPolicy { policyType }
    repository { name location { name } }
  }
}"""

SENSOR = """query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status ticks(limit: 10) { timestamp status requestedAssetKeys { path } } } }
    ... on Error { message }
  }
}"""

LAUNCH_BACKFILL = """mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""

BACKFILL = """query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs { runId status } }
    ... on Error { message }
  }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status } }
  }
}"""

MATERIALIZATIONS = """query Materializations($key: AssetKeyInput!) {
  assetNodes(assetKeys: [$key]) {
    assetMaterializations(limit: 50) {
      runId
      partition
      metadataEntries { label ... on PathMetadataEntry { path } }
    }
  }
}"""

RUN = """query Run($id: ID!) {
  runOrError(runId: $id) {
    __typename
    ... on Run { status creationTime tags { key value } }
    ... on Error { message }
  }
}"""

# The plot is markdown metadata: the partition page shows "[Show Markdown]" in its row, the click opens a dialog.
SHOW_PLOT_LINK = """(() => {
  const key = Array.from(document.querySelectorAll('tr td:first-child span'))
    .find(e => e.textContent.trim() === 'plot: L0 vs NMSE (PNG)');
  const link = key && Array.from(key.closest('tr').querySelectorAll('a'))
    .find(a => a.textContent.trim() === '[Show Markdown]');
  if (!link) return false;
  link.setAttribute('data-e2e', 'show-plot');
  return document.body.innerText.includes('layer_-1/sweep.csv');
})()"""
PLOT_IN_DIALOG = """Array.from(document.querySelectorAll('[role=dialog] img'))
  .map(i => [i.getAttribute('src').slice(0, 22), i.alt, i.complete ? i.naturalWidth : 0])"""


def pids_with_env(entry: str) -> list[int]:
    """Our processes whose environment holds ``entry`` (every process dagster dev starts inherits its own)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if entry.encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone, or not ours
            pass
    return found


class DagsterDev:
    """`dagster dev` in its own process group, and a GraphQL client for it that only talks to 127.0.0.1."""

    def __init__(self, home, pipeline, log_path):
        self.home, self.port = str(home), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = str(log_path)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        env = {**os.environ, "DAGSTER_HOME": self.home, "SAEV_PIPELINE": str(pipeline)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                dagster_dev_argv(self.port),
                cwd=REPO,
                env=env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def graphql(self, query: str, **variables) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"query": query, "variables": variables}).encode(),
        )
        with self._opener.open(request, timeout=30) as response:
            body = json.load(response)
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def wait_until_served(self, deadline: float) -> list[dict]:
        """Wait for the webserver and the code location; returns the asset nodes."""
        while True:
            assert self.proc.poll() is None, f"dagster dev exited with {self.proc.returncode}; see {self.log_path}"
            try:
                nodes = self.graphql(ASSET_GRAPH)["assetNodes"]
                if nodes:
                    return nodes
            except OSError:
                pass
            assert time.monotonic() < deadline, f"dagster dev did not serve the code location; see {self.log_path}"
            time.sleep(1)

    def stop(self) -> list[int]:
        """SIGTERM to the group, SIGKILL to what is left of it; returns the pids of processes that had left the
        group (killed too, by pid)."""
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        self.proc.wait()
        deadline = time.monotonic() + 10
        while (left := pids_with_env(f"DAGSTER_HOME={self.home}")) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def wait_for(what: str, poll, deadline: float, log_path: str, every: float = 3.0):
    """Call ``poll`` every ``every`` seconds until it returns something truthy; fail naming ``what`` at the
    deadline. The daemons work in 30-s loops: polling GraphQL faster would only load the webserver."""
    while True:
        value = poll()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}; dagster dev's log: {log_path}"
        time.sleep(every)


@pytest.fixture
def pipeline(tmp_path, tiny_clip_ckpt):
    """The tiny pipeline with its own copy of the checkpoint (the test replaces it) and sources observed every
    minute."""
    shutil.copy(tiny_clip_ckpt.split("/", 1)[1], tmp_path / "tiny.pt")
    write_images(tmp_path / "imgs", 6)
    path = tmp_path / "pipeline.toml"
    text = tiny_pipeline_text(tmp_path, f"saev-tiny-clip/{tmp_path / 'tiny.pt'}", LAYERS)
    # two recording ops per run: the run worker's multiprocess executor fans the recording out
    path.write_text(
        text.replace("n_workers = 0\n", "n_workers = 0\nn_workers_fanout = 2\n", 1)
        + '[automation]\nobserve_cron = "* * * * *"\n'
    )
    return path


@pytest.fixture
def dagster_home(tmp_path, pipeline):
    """An instance folder, telemetry and the welcome dialog off, where the sources were observed once.

    Observed first, as `python -m saev_dagster.demo` does: the first observation of a never-observed source counts
    as an update, so a backfill launched before it would be followed by an automated re-run of activations and of
    everything downstream, and a re-run could not be told apart from one caused by new weights."""
    import dagster as dg

    from saev_dagster.definitions import build_definitions
    from saev_dagster.observation import observe_sources

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    defs = build_definitions(str(pipeline))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert {e.asset_key.to_user_string() for e in observe_sources(defs, instance)} == {
            "vit_checkpoint",
            "image_source",
        }
    return home


@pytest.fixture
def dagster_dev(tmp_path, dagster_home, pipeline):
    server = DagsterDev(dagster_home, pipeline, tmp_path / "dagster_dev.log")
    yield server
    left = server.stop()
    assert not left, f"processes of dagster dev outside its process group were still running (killed): {left}"


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (the gallery tests' harness) in its own process group, killed with it at the end."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); the UI is not checked")
    # The harness execs the executable it is given with the DevTools pipe on fds 3 and 4; setsid(1) keeps the pid
    # (the harness's child is no group leader) and makes it the leader of a new group.
    wrapper = tmp_path / "chromium-own-group"
    wrapper.write_text(f'#!/bin/sh\nexec setsid {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    chromium = Chromium(str(wrapper))
    try:
        yield chromium
    finally:
        chromium.close()
        try:
            os.killpg(chromium.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group ended with the browser, as it should
            pass


def materializations(server: DagsterDev, asset: str) -> list[dict]:
    (node,) = server.graphql(MATERIALIZATIONS, key={"path": [asset]})["assetNodes"]
    return [
        {
            "run_id": m["runId"],
            "partition": m["partition"],
            **{e["label"]: e["path"] for e in m["metadataEntries"] if "path" in e},
        }
        for m in node["assetMaterializations"]
    ]


def run_of(server: DagsterDev, run_id: str) -> dict:
    run = server.graphql(RUN, id=run_id)["runOrError"]
    assert run["__typename"] == "Run", run
    return {**run, "tags": {t["key"]: t["value"] for t in run["tags"]}}


@pytest.mark.timeout(420)
def test_dagster_dev_backfills_in_one_run_reruns_on_new_weights_and_shows_the_sweep_plot(
    browser, dagster_dev, tmp_path
):
    from saev_core.record.vit import save_random_weights

    deadline = time.monotonic() + BUDGET_S
    log = dagster_dev.log_path

    # Lineage, as the asset graph page reads it.
    nodes = dagster_dev.wait_until_served(deadline)
    deps = {"/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]} for n in nodes}
    assert deps == {
        "vit_checkpoint": set(),
        "image_source": set(),
        "activations": {"vit_checkpoint", "image_source"},
        "sae_sweep": {"activations"},
        "topk_visuals": {"sae_sweep"},
        "sweep_report": {"sae_sweep", "topk_visuals"},
    }
    acts = next(n for n in nodes if n["assetKey"]["path"] == ["activations"])
    assert acts["partitionKeys"] == [str(x) for x in LAYERS]
    assert acts["backfillPolicy"]["policyType"] == "SINGLE_RUN"

    # The automation sensor runs by default. Its first evaluation requests nothing; wait for it, so that what the
    # backfill materializes is an update the sensor sees (and trains the sweeps on).
    repo = acts["repository"]
    selector = {
        "repositoryLocationName": repo["location"]["name"],
        "repositoryName": repo["name"],
        "sensorName": "saev_automation",
    }

    def first_tick():
        sensor = dagster_dev.graphql(SENSOR, selector=selector)["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        assert sensor["sensorState"]["status"] == "RUNNING"
        ticks = sorted(sensor["sensorState"]["ticks"], key=lambda t: t["timestamp"])
        return ticks[0] if ticks and ticks[0]["status"] != "STARTED" else None  # listed while it evaluates, too

    first = wait_for("the automation sensor's first tick", first_tick, deadline, log)
    assert first["status"] == "SKIPPED" and first["requestedAssetKeys"] == [], first

    # A backfill of every layer: one run (single-run backfill policy), which succeeds.
    launched = dagster_dev.graphql(
        LAUNCH_BACKFILL,
        params={
            "assetSelection": [{"path": ["activations"]}],
            "partitionNames": [str(x) for x in LAYERS],
            "title": "e2e: every layer",
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def backfill_run_done():
        data = dagster_dev.graphql(BACKFILL, id=backfill_id)
        backfill = data["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        assert backfill["status"] not in ("FAILED", "COMPLETED_FAILED", "CANCELED", "FAILING"), (backfill, log)
        runs = data["runsOrError"]["results"]
        assert [r for r in runs if r["status"] in ("FAILURE", "CANCELED")] == [], (runs, log)
        return [r["runId"] for r in runs if r["status"] == "SUCCESS"]

    (backfill_run,) = wait_for("the backfill's run", backfill_run_done, deadline, log)
    recorded = [m for m in materializations(dagster_dev, "activations") if m["run_id"] == backfill_run]
    assert sorted(m["partition"] for m in recorded) == sorted(str(x) for x in LAYERS)
    (first_store,) = {m["store_path"] for m in recorded}
    assert ActivationStore.open(first_store).is_complete  # both recording ops of the fan-out wrote their blocks

    # The automation trains the sweeps on the first store. Wait for that before the new weights: an observation
    # that lands in the same automation tick as the backfill's materialization can be cancelled by it (eager's
    # "since last handled" sees both at once), which is a race of this script, not a user's workflow.
    wait_for(
        "the automated sae_sweep[-1] on the first store",
        lambda: any(m["partition"] == "-1" for m in materializations(dagster_dev, "sae_sweep")),
        deadline,
        log,
    )

    # New weights in the checkpoint file, replaced atomically as a user's copy would be.
    weights = tmp_path / "tiny.pt"
    save_random_weights("clip", "saev-tiny-clip", tmp_path / "new.pt", seed=5)
    os.replace(tmp_path / "new.pt", weights)
    edited_at = time.time()

    # The next observation sees them and the automation records every layer again, in one run, into a new store
    # (its key fingerprints the checkpoint).
    def rerun_and_sweep():
        reruns = {}
        for m in materializations(dagster_dev, "activations"):
            if m["run_id"] != backfill_run:
                reruns.setdefault(m["run_id"], []).append(m)
        done = []
        for run_id, mats in reruns.items():
            run = run_of(dagster_dev, run_id)
            assert run["status"] not in ("FAILURE", "CANCELED"), (run, log)
            if run["status"] == "SUCCESS":
                done.append((run_id, run, mats))
        swept = any(m["partition"] == "-1" for m in materializations(dagster_dev, "sae_sweep"))
        return (done, swept) if done and swept else None

    done, _ = wait_for("the automated re-run of activations and sae_sweep[-1]", rerun_and_sweep, deadline, log)
    assert len(done) == 1, f"expected one re-run of activations, got {[d[0] for d in done]}"
    ((_, rerun, mats),) = done
    assert rerun["tags"].get("dagster/from_automation_condition") == "true", rerun["tags"]
    assert rerun["tags"].get("dagster/sensor_name") == "saev_automation", rerun["tags"]
    assert rerun["creationTime"] > edited_at
    assert sorted(m["partition"] for m in mats) == sorted(str(x) for x in LAYERS)  # one run, every layer
    (new_store,) = {m["store_path"] for m in mats}
    assert new_store != first_store  # recorded with the new weights, not a reused store

    # The backfill ended with its one run.
    data = dagster_dev.graphql(BACKFILL, id=backfill_id)
    assert data["partitionBackfillOrError"]["status"] == "COMPLETED_SUCCESS", data
    assert [r["runId"] for r in data["partitionBackfillOrError"]["runs"]] == [backfill_run]
    assert [r["runId"] for r in data["runsOrError"]["results"]] == [backfill_run]

    # The UI: the asset page of sae_sweep, partition -1, shows the L0-vs-NMSE plot, loaded from the page itself.
    tab = browser.open(f"{dagster_dev.url}/assets/sae_sweep?view=partitions&partition=-1")
    wait_for(
        "the L0-vs-NMSE plot's row of sae_sweep[-1] on its asset page",
        lambda: tab.js(SHOW_PLOT_LINK),
        deadline,
        log,
        every=0.5,
    )
    tab.click('[data-e2e="show-plot"]')
    plots = wait_for(
        "the plot in the markdown dialog",
        lambda: [p for p in tab.js(PLOT_IN_DIALOG) if p[0] == "data:image/png;base64," and p[2] > 0],
        deadline,
        log,
        every=0.5,
    )
    assert [alt for _, alt, _ in plots] == ["L0 vs NMSE"], (plots, tab.errors())
    local = (f"{dagster_dev.url}/", "data:", "blob:")
    assert [u for u in tab.requested_urls() if not u.startswith(local)] == []
