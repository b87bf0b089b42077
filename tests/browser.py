"""Headless Chromium driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: NUL-separated
JSON on file descriptors 3 and 4), with the standard library only: no playwright, no websocket, no port. The
gallery, explorer and Dagster UI tests share it; they skip only when /usr/bin/chromium is absent."""

import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

CHROMIUM = "/usr/bin/chromium"


class Chromium:
    """Headless Chromium driven through the DevTools protocol over ``--remote-debugging-pipe``."""

    def __init__(self, exe: str = CHROMIUM):
        self.profile = tempfile.mkdtemp(prefix="saev-chromium-")
        child_in, self._to_child = os.pipe()
        self._from_child, child_out = os.pipe()
        # Move the child's ends above fd 9 first: 3<&4 4>&3 would swap them into a loop.
        child_in, child_out = (self._above_9(fd) for fd in (child_in, child_out))
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--mute-audio",
            # Belt and braces: an http(s) request would go to a dead local proxy, never off the machine.
            "--proxy-server=127.0.0.1:9",
            "--window-size=1280,900",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self._log = open(os.path.join(self.profile, "stderr.log"), "wb")
        # The protocol wants the pipe on fds 3 (commands in) and 4 (replies out); bash puts them there (dash
        # cannot name fds above 9).
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{child_in} 4>&{child_out}', "bash", *args],
            pass_fds=(child_in, child_out),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        os.close(child_in)
        os.close(child_out)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._id = 0
        self.events: list[dict] = []

    @staticmethod
    def _above_9(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def _read(self):
        buf = b""
        while chunk := os.read(self._from_child, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for message in messages:
                self._replies.put(json.loads(message))
        os.close(self._from_child)  # chromium exited
        self._replies.put(None)

    def _next(self, deadline: float) -> dict:
        try:
            message = self._replies.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no answer from chromium; its log: {self.profile}/stderr.log") from None
        if message is None:
            raise RuntimeError(f"chromium closed the pipe; its log: {self.profile}/stderr.log")
        return message

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 15):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while (reply := self._next(deadline)).get("id") != self._id:
            self.events.append(reply)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> "Tab":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=session)
        tab = Tab(self, session)
        self.call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + 15
        while not tab.events("Page.loadEventFired"):
            self.events.append(self._next(deadline))
        return tab

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_child)
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def events(self, method: str) -> list[dict]:
        return [
            e["params"] for e in self.browser.events if e.get("sessionId") == self.session and e.get("method") == method
        ]

    def js(self, expression: str):
        result = self.browser.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str):
        """A real mouse click (pressed + released) at the centre of the element."""
        x, y = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.browser.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                session=self.session,
            )

    def requested_urls(self) -> list[str]:
        return [e["request"]["url"] for e in self.events("Network.requestWillBeSent")]

    def errors(self) -> list[str]:
        found = [
            f"console.{e['type']}: {e['args']}"
            for e in self.events("Runtime.consoleAPICalled")
            if e["type"] in ("error", "assert")
        ]
        found += [f"exception: {e['exceptionDetails']}" for e in self.events("Runtime.exceptionThrown")]
        found += [
            f"log: {e['entry']['text']} {e['entry'].get('url', '')}"
            for e in self.events("Log.entryAdded")
            if e["entry"]["level"] == "error"
        ]
        return found

    def images(self) -> list[tuple[str, int]]:
        return self.js("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete ? i.naturalWidth : 0])")

    def row_order(self) -> list[int]:
        return self.js(
            "Array.from(document.querySelectorAll('#latents tbody tr[data-latent]')).map(r => +r.dataset.latent)"
        )


def chromium_or_skip(unchecked: str = ""):
    """For a fixture (``yield from chromium_or_skip(...)``): a started Chromium, closed after the test or module; the
    test is skipped, its reason ending in ``unchecked`` (what goes unchecked), when Debian's chromium is absent."""
    if not os.path.exists(CHROMIUM):
        import pytest

        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium){unchecked}")
    chromium = Chromium()
    yield chromium
    chromium.close()
