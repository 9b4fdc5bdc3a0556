"""Open a page in headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: JSON messages
on file descriptors 3 and 4, so no websocket library and no port), and report what a user would see:
console errors, exceptions, failed or network requests, the size of every ``<img>``/``<svg>``, and
screenshots of the page and of each plot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@dataclass
class Rendered:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed_requests: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)  # id, tag, width, height, natural sizes, complete
    screenshot: bytes = b""  # PNG of the whole page
    plot_screenshots: dict[str, bytes] = field(default_factory=dict)  # plot id -> PNG of its box
    title: str = ""


class _Pipe:
    def __init__(self, binary: str, user_data_dir: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire() -> None:  # the child reads commands on fd 3 and writes replies on fd 4
            import fcntl

            # Out of the way first (either pipe end may itself be fd 3 or 4), then into place; dup2 makes
            # the copies inheritable (os.pipe's own fds are not).
            read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        # close_fds=False: subprocess would otherwise close fds 3 and 4 after preexec_fn has set them up.
        self.process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=wire, close_fds=False)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


PLOT_BOXES = """JSON.stringify(Array.from(document.querySelectorAll('img, svg')).map((e, i) => {
  const r = e.getBoundingClientRect();
  return {id: e.id || ('element-' + i), tag: e.tagName.toLowerCase(), x: r.x + window.scrollX, y: r.y + window.scrollY,
          width: r.width, height: r.height, naturalWidth: e.naturalWidth || 0, naturalHeight: e.naturalHeight || 0,
          complete: e.complete === undefined ? true : e.complete};
}))"""


def render(page: Path, binary: str, width: int = 1200, timeout: float = 60) -> Rendered:
    """Load ``page`` (a file) in a fresh headless Chromium profile and collect what it shows."""
    result = Rendered()
    with tempfile.TemporaryDirectory() as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                              "mobile": False}, session=session)
            pipe.events.clear()
            pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout=timeout)
            # Decode every image before measuring (data URIs decode asynchronously).
            pipe.send("Runtime.evaluate", {"expression": "Promise.all(Array.from(document.images).map(i => i.decode()))"
                                                         ".then(() => true)", "awaitPromise": True}, session=session)
            result.title = pipe.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                                     session=session)["result"]["value"]
            boxes = pipe.send("Runtime.evaluate", {"expression": PLOT_BOXES, "returnByValue": True}, session=session)
            result.plots = json.loads(boxes["result"]["value"])
            result.screenshot = base64.b64decode(pipe.send("Page.captureScreenshot", {"format": "png",
                                                           "captureBeyondViewport": True}, session=session)["data"])
            for plot in result.plots:
                if plot["width"] > 0 and plot["height"] > 0:
                    clip = {k: plot[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
                    shot = pipe.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                                     session=session)
                    result.plot_screenshots[plot["id"]] = base64.b64decode(shot["data"])
            for event in pipe.events:
                method, params = event.get("method"), event.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    result.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    result.console_errors.append(str(params.get("exceptionDetails", {}).get("text")))
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    result.console_errors.append(params["entry"].get("text", ""))
                elif method == "Network.requestWillBeSent":
                    result.requests.append(params["request"]["url"])
                elif method == "Network.loadingFailed":
                    result.failed_requests.append(f"{params.get('errorText')} ({params.get('type')})")
        finally:
            pipe.close()
    return result
