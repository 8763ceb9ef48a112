"""Only same-origin JSON POSTs with the CSRF token start work from ``/sci-node/`` (real Orthanc + plugin).

A forged cross-site POST (a form on another origin, ``text/plain`` or form-encoded, sent with the
browser's stored Orthanc login) is refused and queues nothing; the status page's own buttons, in a
real Chromium, still work.
"""
from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from chromium_cdp import Browser
from conftest import free_port, make_mr_series, wait_for
from stack_support import PASSWORD, USER, StackProc, orthanc_log

pytestmark = pytest.mark.slow


def _post(stack: StackProc, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(stack.url + path, auth=(USER, PASSWORD), trust_env=False, timeout=30, **kw)


def _forwards(stack: StackProc) -> list[dict[str, Any]]:
    return list(stack.sci_node_jobs()["forwards"])


def test_forged_posts_are_refused_and_real_ones_need_the_token(tmp_path: Path) -> None:
    stack = StackProc(tmp_path / "d", toml='processor = "derived-sc"\n').start()
    try:
        series = make_mr_series(tmp_path / "s", n=3)
        stack.storescu(series)
        wait_for(lambda: len(_forwards(stack)) == 1, 30, interval=1, what="the first forward")
        uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
        path = f"/sci-node/series/{uid}/process"
        evil = {"Origin": "http://evil.example"}
        forged = [
            _post(stack, path, content="x", headers={**evil, "Content-Type": "text/plain"}),  # the forgery
            _post(stack, path, content="a=b", headers={**evil, "Content-Type": "application/x-www-form-urlencoded"}),
            _post(stack, path, content="{}", headers={"Content-Type": "text/plain"}),  # same origin, not JSON
            _post(stack, path, json={}),  # JSON, but no token
        ]
        assert [r.status_code for r in forged] == [415, 415, 415, 403], [r.text for r in forged]
        token = httpx.get(stack.url + "/sci-node/csrf", auth=(USER, PASSWORD), trust_env=False).json()["token"]
        header = {"X-SCI-Node-CSRF": token}
        assert _post(stack, path, json={}, headers={**header, **evil}).status_code == 403  # token, other origin
        assert _post(stack, path, json={}, headers={**header, "Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert _post(stack, path, json={}, headers={"X-SCI-Node-CSRF": "0" * 40}).status_code == 403
        assert len(_forwards(stack)) == 1  # none of them queued anything
        ok = _post(stack, path, json={}, headers={**header, "Origin": stack.url})
        assert ok.status_code == 200 and ok.json()["reason"] == "manual", ok.text
        assert len(_forwards(stack)) == 2
        assert "POST /sci-node/series/" in orthanc_log(stack) and "refused: cross-origin" in orthanc_log(stack)
        _browser_checks(stack, tmp_path, path)
    finally:
        assert stack.stop() == 0


class _AttackPage(http.server.BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: Any) -> None:
        pass


def _browser_checks(stack: StackProc, tmp_path: Path, path: str) -> None:
    """In Chromium holding the login: another site's auto-submitted form and fetch queue nothing;
    the status page's own "reprocess" button queues a forward."""
    target = stack.url + path
    _AttackPage.page = (f'<form id="f" method="POST" enctype="text/plain" action="{target}"><input name="x" '
                        'value="1"></form><script>fetch("' + target + '", {method: "POST", credentials: "include", '
                        'headers: {"Content-Type": "application/json"}, body: "{}"}).catch(function () {});'
                        'document.getElementById("f").submit();</script>').encode()
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _AttackPage)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with Browser(tmp_path / "chromium") as browser:
        browser.send("Page.enable")
        browser.send("Network.enable")
        browser.send("Network.setExtraHTTPHeaders", headers={"Authorization": auth})  # the stored login
        before = len(_forwards(stack))
        browser.send("Page.navigate", url=f"http://127.0.0.1:{evil.server_address[1]}/")
        browser.wait_for(f"location.href.startsWith({stack.url!r})", 20)  # the form was submitted
        text = browser.wait_for("document.body && document.body.innerText", 10) or ""
        assert "must be application/json" in text, text  # Orthanc's answer to the forged form: 415
        assert len(_forwards(stack)) == before
        browser.send("Page.navigate", url=stack.url + "/sci-node/")
        assert browser.wait_for("!!document.querySelector('button[data-sci-node-post]')", 30)
        browser.evaluate("document.querySelector('button[data-sci-node-post]').click()")
        wait_for(lambda: len(_forwards(stack)) == before + 1, 30, interval=0.5, what="the button's forward")
    evil.shutdown()
    after = _forwards(stack)
    assert len(after) == before + 1 and after[-1]["reason"] == "manual", after
