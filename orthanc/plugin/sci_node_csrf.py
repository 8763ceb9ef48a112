"""Cross-site request forgery guard of the plugin's ``POST /sci-node/...`` routes (no ``orthanc`` import).

A browser that holds the Orthanc login sends it with *any* request to Orthanc's origin, including
a form another site submits (``Content-Type: text/plain`` or ``application/x-www-form-urlencoded``
need no CORS preflight). So a route that starts work accepts a request only when

1. its ``Content-Type`` is ``application/json`` (a cross-origin page cannot send that without a
   CORS preflight, and Orthanc answers none);
2. its ``Origin`` (else its ``Referer``), when the browser sent one, is Orthanc's own origin, and
   ``Sec-Fetch-Site``, when sent, is ``same-origin`` or ``none``;
3. its ``X-SCI-Node-CSRF`` header carries the token for the caller's login: an HMAC of the
   request's ``Authorization`` header under a secret drawn at each Orthanc start. The status page
   embeds it; scripts read it from ``GET /sci-node/csrf`` (behind the same login; no other origin
   can read that answer).

:data:`POST_JS` is the status page's one way to POST (its buttons use it).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import urllib.parse
from typing import Any

TOKEN_HEADER = "X-SCI-Node-CSRF"


def _headers(request: dict[str, Any]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (request.get("headers") or {}).items()}


def _same_origin(url: str, host: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    return parsed.scheme in ("http", "https") and bool(host) and parsed.netloc.lower() == host.lower()


class CsrfGuard:
    """Issues per-login tokens and checks the POST requests that start work."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def token(self, request: dict[str, Any]) -> str:
        """The token of the login that made ``request`` (its ``Authorization`` header)."""
        auth = _headers(request).get("authorization", "")
        return hmac.new(self._secret, auth.encode(), hashlib.sha256).hexdigest()[:40]

    def refusal(self, request: dict[str, Any]) -> tuple[int, str] | None:
        """``(HTTP status, reason)`` when ``request`` must not start work, None when it may."""
        headers = _headers(request)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return 415, f"Content-Type must be application/json (got {ctype or 'none'!r})"
        host = headers.get("host", "")
        origin = headers.get("origin")
        source = origin if origin is not None else headers.get("referer")
        if source is not None and source != "null" and not _same_origin(source, host):
            return 403, f"cross-origin request refused ({'Origin' if origin is not None else 'Referer'} {source!r})"
        if origin == "null":
            return 403, "cross-origin request refused (Origin null)"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return 403, f"cross-origin request refused (Sec-Fetch-Site {headers['sec-fetch-site']!r})"
        if not hmac.compare_digest(headers.get(TOKEN_HEADER.lower(), ""), self.token(request)):
            return 403, (f"missing or wrong {TOKEN_HEADER} header: reload the page, or read the token from "
                         "GET /sci-node/csrf")
        try:
            json.loads(request.get("body") or b"{}")
        except ValueError:
            return 400, "the body must be JSON (e.g. {})"
        return None


#: The status page's POST helper: same-origin, JSON, with the page's token (``SCI_NODE_CSRF``).
POST_JS = f"""<script>
function sciNodePost(url, button) {{
  if (button) {{ button.disabled = true; }}
  return fetch(url, {{method: 'POST', credentials: 'same-origin', body: '{{}}',
                      headers: {{'Content-Type': 'application/json', '{TOKEN_HEADER}': SCI_NODE_CSRF}}}})
    .then(function (r) {{ return r.text().then(function (t) {{
      var done = button && (button.getAttribute('data-done') || 'queued');
      if (button) {{ button.textContent = r.ok ? done : ('refused: ' + r.status); }}
      if (!r.ok) {{ alert('sci-node: ' + r.status + ' ' + t); }}
      return r; }}); }});
}}
document.addEventListener('click', function (e) {{
  var b = e.target.closest ? e.target.closest('button[data-sci-node-post]') : null;
  if (b) {{ e.preventDefault(); sciNodePost(b.getAttribute('data-sci-node-post'), b); }}
}});
</script>"""


def page_script(token: str) -> str:
    """The ``<script>`` blocks a status page needs to POST: its token and :data:`POST_JS`."""
    return f"<script>var SCI_NODE_CSRF = {json.dumps(token)};</script>" + POST_JS
