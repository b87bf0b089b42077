"""The explorer's cold start: from process start to the server answering, and to the first latent on screen.

    .venv/bin/python benchmarks/bench_explorer_start.py --visuals runs/demo/visuals/layer_-2/<member_id> \
        [--sweep runs/demo/checkpoints/layer_-2] [--runs 3] [--no-browser]

Each run starts ``python -m saev_core explore`` as a fresh process (its own process group, stopped by its PID at the
end) and measures:

  (a) **answer**: wall seconds from ``Popen`` to the first HTTP 200 on ``/``, polled every 50 ms; with the
      process's CPU seconds (user + system, from /proc/PID/stat) at that moment, a figure that machine load does not
      inflate, and whether libtorch is mapped into it yet (/proc/PID/maps);
  (b) **first latent**: wall seconds from ``Popen`` until the page, opened in Debian's headless Chromium as soon as
      the server answers (tests/browser.py), shows the first latent's summary and top images (the page's load reads
      the visuals cache and draws the histogram), and whether libtorch is mapped into the process then.

Nothing is written into the visuals or sweep folders (no member is opened); Gradio's temporary files go to a
temporary folder. The first run after a reboot also pays the page cache; the table shows every run.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import CHROMIUM, Chromium  # noqa: E402
from tests.processes import free_port, stop_group  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (fields 14 and 15 of /proc/PID/stat, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def torch_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def one_run(args, tmp: str, browser: Chromium | None) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_TEMP_DIR": os.path.join(tmp, "gradio")}
    cmd = [sys.executable, "-m", "saev_core", "explore", "--visuals", args.visuals, "--port", str(port)]
    cmd += ["--sweep", args.sweep] if args.sweep else []
    log = open(os.path.join(tmp, f"explore-{port}.log"), "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the explorer exited: {open(log.name).read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        out = {"answer_s": time.monotonic() - t0, "cpu_s": cpu_seconds(proc.pid), "torch": torch_mapped(proc.pid)}
        if browser is not None:
            tab = browser.open(f"http://127.0.0.1:{port}/")
            shown = (
                "(document.querySelector('#latent-summary') || {innerText: ''}).innerText.includes('Latent ') && "
                "Array.from(document.querySelectorAll('#latent-images img')).some(i => i.complete && i.naturalWidth)"
            )
            while not tab.js(shown):
                if time.monotonic() - t0 > 180:
                    raise RuntimeError("no latent shown within 180 s")
                time.sleep(0.05)
            out["first_latent_s"] = time.monotonic() - t0
            out["torch_first"] = torch_mapped(proc.pid)
        return out
    finally:
        stop_group(proc, wait_s=15)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--visuals", required=True)
    parser.add_argument("--sweep", default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true", help="only (a): no Chromium")
    args = parser.parse_args()
    use_browser = not args.no_browser and os.path.exists(CHROMIUM)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; browser: {use_browser}")
    print("run  answer (s)  CPU at answer (s)  torch loaded at answer  first latent shown (s)  torch loaded then")
    with tempfile.TemporaryDirectory() as tmp:
        browser = Chromium() if use_browser else None
        try:
            for i in range(args.runs):
                r = one_run(args, tmp, browser)
                first = f"{r['first_latent_s']:.1f}" if "first_latent_s" in r else "-"
                then = str(r.get("torch_first", "-"))
                answer = f"{i:3d}  {r['answer_s']:10.1f}  {r['cpu_s']:17.1f}  {str(r['torch']):>22}"
                print(f"{answer}  {first:>22}  {then:>17}")
        finally:
            if browser is not None:
                browser.close()
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
