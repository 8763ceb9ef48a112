"""A minimal headless-Chromium driver over the DevTools protocol, for the viewer tests.

Starts Debian's ``chromium`` with the flags the project requires (headless, no sandbox, no GPU,
no background networking/component updates/sync, fresh profile) plus SwiftShader for WebGL,
and talks to the page target over its DevTools WebSocket (``websocket-client``).
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

REQUIRED_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str:
    """The Chromium executable (Debian package ``chromium``)."""
    for name in ("chromium", "chromium-browser"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise FileNotFoundError("chromium is not installed: run bash scripts/install.sh (apt: chromium)")


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, profile_dir: Path, width: int = 1400, height: int = 900) -> None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = profile_dir.parent / (profile_dir.name + "-chromium.log")
        self._log = open(self.log_path, "w", encoding="utf-8")  # a file, so a full pipe never blocks it
        self.proc = subprocess.Popen(
            [chromium_path(), *REQUIRED_FLAGS, f"--user-data-dir={profile_dir}",
             "--enable-unsafe-swiftshader", "--use-angle=swiftshader",  # WebGL in software, no GPU
             f"--window-size={width},{height}", "--remote-debugging-port=0", "--remote-allow-origins=*",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)
        port = self._devtools_port()
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _devtools_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", self.log_path.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"chromium did not report its DevTools port; see {self.log_path}")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call one DevTools method and return its result (events seen meanwhile are kept)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its value."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, poll: float = 0.5) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value (or the last falsy one)."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        return value

    def open_ohif(self, url: str, user: str, password: str, before_load: str = "") -> None:
        """Navigate to an OHIF ``url`` behind Orthanc's basic auth (``before_load``: a script run
        before the page's own, e.g. to hide the first-run dialogs) and wait for the viewer."""
        import base64

        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.send("Page.enable")
        self.send("Network.enable")
        self.send("Network.setExtraHTTPHeaders", headers={"Authorization": auth})
        if before_load:
            self.send("Page.addScriptToEvaluateOnNewDocument", source=before_load)
        self.send("Page.navigate", url=url)
        if self.wait_for("document.title", 30) != "OHIF Viewer":
            raise AssertionError(f"{url} did not open the OHIF viewer")

    def click(self, selector: str) -> bool:
        """Click the first element matching a CSS ``selector`` (an SVG icon too, which has no
        ``.click()``): a bubbling DOM click event; False when nothing matches. (CDP's synthetic
        mouse input never reached OHIF's page in headless Chromium here.)"""
        return bool(self.evaluate(
            f"(() => {{ const e = document.querySelector({selector!r}); if (!e) return false;"
            " e.dispatchEvent(new MouseEvent('click', {bubbles: true, cancelable: true, view: window}));"
            " return true; })()"))

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the page."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Close the socket and stop Chromium."""
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
