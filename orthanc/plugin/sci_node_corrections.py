"""The plugin's side of radiologists' corrections: who stored a SEG, the hand-over, the review buttons.

* :class:`Uploaders` remembers which Orthanc user stored each instance over HTTP. Orthanc records
  no user for a DICOMweb STOW-RS (its metadata ``Origin`` is ``Plugins``, no ``HttpUsername``), so
  the incoming-request filter notes the authenticated user of each POST per Orthanc thread, and
  the stored-instance callback, which Orthanc runs in the same thread right after the store, ties
  the instance to that user. Kept in ``<state>/uploaders.jsonl`` (0600) across restarts. Only
  trusted when Orthanc's own authentication is on (then a request with a wrong password never
  reaches the filter).
* :class:`CorrectionHandoff` hands each SEG the node did not write to ``sci-node corrections
  ingest`` with its sender: ``orthanc-user:NAME`` (HTTP, from :class:`Uploaders`),
  ``dicom:AET@IP`` (C-STORE: Orthanc's ``RemoteAET``/``RemoteIP`` metadata) or nothing (refused by
  the node). Whether that sender may teach the model is the node's decision
  (``[corrections] users`` / ``dicom_senders``).
* :func:`render_corrections` draws the status page's corrections block with ``accept``/``reject``
  buttons for pending ones (same-origin JSON POSTs with the CSRF token, ``sci_node_csrf``).
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import html
import json
import os
import queue
import subprocess
import threading
import time
from typing import Any, Callable

import orthanc  # provided by libOrthancPython.so

#: A correction whose ingest failed (not refused: a crash, a locked index) is tried this often, this far apart.
HANDOFF_ATTEMPTS, HANDOFF_RETRY_S = 3, 5.0
#: How many instance -> user entries :class:`Uploaders` keeps (oldest dropped; SEGs are handed over in seconds).
UPLOADERS_KEPT = 20000


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def basic_user(headers: dict[str, Any]) -> str | None:
    """The user name of an ``Authorization: Basic`` header (already checked by Orthanc), or None."""
    auth = next((str(v) for k, v in (headers or {}).items() if str(k).lower() == "authorization"), "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user if user and user.isprintable() else None


class Uploaders:
    """Instance id -> the Orthanc user whose HTTP request stored it."""

    def __init__(self, state_dir: str, trusted: bool) -> None:
        self.trusted = trusted  # Orthanc's AuthenticationEnabled: else a header names nobody
        self.path = os.path.join(state_dir, "uploaders.jsonl")
        self._by_thread: dict[int, str] = {}
        self._lock = threading.Lock()
        self._users: dict[str, str] = {}
        try:
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    entry = json.loads(line)
                    self._users[str(entry["instance"])] = str(entry["user"])
        except (OSError, ValueError, KeyError):
            pass

    def on_request(self, uri: str, **request: Any) -> bool:
        """Incoming-request filter: note the user of each POST/PUT in this thread; never refuses."""
        try:
            user = basic_user(request.get("headers") or {}) if self.trusted else None
            ident = threading.get_ident()
            with self._lock:
                if user and request.get("method") in (orthanc.HttpMethod.POST, orthanc.HttpMethod.PUT):
                    self._by_thread[ident] = user
                else:
                    self._by_thread.pop(ident, None)
        except Exception as exc:  # noqa: BLE001 - a filter must never raise into Orthanc
            orthanc.LogError(f"sci-node: request filter: {exc!r}")
        return True

    def on_stored(self, dicom: Any, instance_id: str) -> None:
        """Stored-instance callback (same thread as the request): tie the instance to the request's user."""
        try:
            if dicom.GetInstanceOrigin() not in (orthanc.InstanceOrigin.REST_API, orthanc.InstanceOrigin.PLUGIN):
                return
            with self._lock:
                user = self._by_thread.get(threading.get_ident())
                if not user:
                    return
                self._users[instance_id] = user
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"instance": instance_id, "user": user, "time": _now()}) + "\n")
                while len(self._users) > UPLOADERS_KEPT:  # the oldest first (dicts keep insertion order)
                    del self._users[next(iter(self._users))]
        except Exception as exc:  # noqa: BLE001 - a callback must never raise into Orthanc
            orthanc.LogError(f"sci-node: stored-instance callback: {exc!r}")

    def user_of(self, instance_id: str) -> str | None:
        """The Orthanc user who stored ``instance_id`` over HTTP, or None."""
        with self._lock:
            return self._users.get(instance_id)


def _metadata(instance: str, name: str) -> str:
    try:
        return orthanc.RestApiGet(f"/instances/{instance}/metadata/{name}").decode(errors="replace").strip()
    except Exception:  # noqa: BLE001 - absent
        return ""


def sender_of(instance: str, uploaders: Uploaders) -> str | None:
    """``dicom:AET@IP`` for a C-STORE, ``orthanc-user:NAME`` for an authenticated upload, else None."""
    if _metadata(instance, "Origin") == "DicomProtocol":
        aet, ip = _metadata(instance, "RemoteAET"), _metadata(instance, "RemoteIP")
        return f"dicom:{aet}@{ip}" if aet and ip else None
    user = uploaders.user_of(instance)
    return f"orthanc-user:{user}" if user else None


class CorrectionHandoff:
    """Hands SEGs the node did not write to ``sci-node corrections ingest`` (one background thread).

    :meth:`consider` runs in Orthanc's change callback and only queues instance ids; the
    worker thread reads each instance file through the REST API, writes it to
    ``<state>/corrections-inbox/``, runs the node's CLI on it with its sender and appends the
    outcome to ``<state>/corrections.jsonl`` (instances already handed over are never handed again).
    """

    def __init__(self, cli: list[str], node_flags: list[str], state_dir: str, node_aet: str,
                 uploaders: Uploaders) -> None:
        self._argv = cli + ["corrections", "--json", *node_flags, "ingest", "--origin", "orthanc"]
        self.node_aet = node_aet
        self.uploaders = uploaders
        self.inbox = os.path.join(state_dir, "corrections-inbox")
        self.record_path = os.path.join(state_dir, "corrections.jsonl")
        self._queue: "queue.Queue[str]" = queue.Queue()
        self._lock = threading.Lock()
        self._handed: set[str] = set()
        try:
            with open(self.record_path, encoding="utf-8") as fh:
                self._handed = {json.loads(line).get("instance", "") for line in fh if line.strip()}
        except (OSError, ValueError):
            pass
        threading.Thread(target=self._run, name="sci-node-corrections", daemon=True).start()

    @staticmethod
    def _tag(instance: str, tag: str) -> str:
        try:
            return orthanc.RestApiGet(f"/instances/{instance}/content/{tag}").decode(errors="replace").strip(" \x00")
        except Exception:  # noqa: BLE001 - the tag is absent
            return ""

    def node_authored(self, instance: str) -> str | None:
        """Why ``instance`` is the node's own SEG (RemoteAET, Manufacturer + ContentCreatorName), or None."""
        aet = _metadata(instance, "RemoteAET")  # STOW-RS uploads have none
        if aet == self.node_aet:
            return f"sent by the node ({aet})"
        if self._tag(instance, "0008-0070") == "sci-node" and self._tag(instance, "0070-0084").startswith("sci-node^"):
            return "Manufacturer sci-node, ContentCreatorName sci-node^..."
        return None

    def consider(self, series_id: str, series: dict[str, Any]) -> None:
        """Queue every instance of a SEG series not yet handed over and not written by the node."""
        for instance in series.get("Instances", []):
            with self._lock:
                if instance in self._handed:
                    continue
            own = self.node_authored(instance)
            if own:
                orthanc.LogInfo(f"sci-node: SEG instance {instance} is the node's own ({own}): not a correction")
                continue
            with self._lock:
                self._handed.add(instance)
            self._queue.put(instance)

    def _run(self) -> None:
        while True:
            instance = self._queue.get()
            try:
                self._hand_over(instance)
            except Exception as exc:  # noqa: BLE001 - a background thread must not die
                orthanc.LogError(f"sci-node: SEG instance {instance}: correction hand-over failed: {exc!r}")

    def _ingest(self, instance: str, sender: str | None) -> dict[str, Any]:
        """One run of the node's CLI on the instance's file: its outcome (state, reason, correction)."""
        os.makedirs(self.inbox, mode=0o700, exist_ok=True)
        path = os.path.join(self.inbox, f"{instance}.dcm")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orthanc.RestApiGet(f"/instances/{instance}/file"))
        try:
            argv = self._argv + (["--sender", sender] if sender else [])
            proc = subprocess.run(argv + [path], capture_output=True, text=True, timeout=600)
        finally:
            os.unlink(path)
        try:
            return dict(json.loads(proc.stdout.strip().splitlines()[-1])[0])
        except (ValueError, IndexError, TypeError):
            return {"state": "error", "reason": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}

    def _hand_over(self, instance: str) -> None:
        sender = sender_of(instance, self.uploaders)
        for attempt in range(HANDOFF_ATTEMPTS):  # "error" = the ingest failed (not refused): try again
            outcome = self._ingest(instance, sender)
            if outcome.get("state") != "error" or attempt == HANDOFF_ATTEMPTS - 1:
                break
            orthanc.LogWarning(f"sci-node: SEG instance {instance}: correction hand-over failed "
                               f"({outcome.get('reason')}), attempt {attempt + 1} of {HANDOFF_ATTEMPTS}")
            time.sleep(HANDOFF_RETRY_S)
        corr = outcome.get("correction") or {}
        record = {"time": _now(), "instance": instance, "sender": sender, "state": outcome.get("state"),
                  "reason": outcome.get("reason"), "correction": corr.get("id")}
        with self._lock, open(self.record_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        log = orthanc.LogWarning if record["state"] in ("refused", "error") else orthanc.LogInfo
        log(f"sci-node: SEG instance {instance} from {sender or 'an unauthenticated sender'}: correction "
            f"{record['state']}" + (f" ({record['reason']})" if record["reason"] else "")
            + (f" as correction {record['correction']}" if record["correction"] else ""))


def review(cli: list[str], node_flags: list[str], correction_id: str, action: str,
           user: str | None) -> tuple[int, str]:
    """Run ``sci-node corrections accept|reject ID --by orthanc-user:USER``: ``(HTTP status, JSON answer)``."""
    argv = cli + ["corrections", "--json", *node_flags, action, correction_id,
                  "--by", f"orthanc-user:{user or 'unknown'}"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        result = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
        return 500, json.dumps({"id": correction_id, "error": f"sci-node corrections {action} failed: {exc!r}"})
    return (200 if not result.get("error") else 409), json.dumps(result)


def _buttons(c: dict[str, Any]) -> str:
    if c.get("state") != "pending":
        return ""
    cid = html.escape(str(c.get("id")))
    reject = f'<button data-sci-node-post="/sci-node/corrections/{cid}/reject" data-done="rejected">reject</button>'
    if c.get("flags"):  # never accepted with one click: the CLI's --force after a look
        return reject + f" <small>flagged: sci-node corrections accept {cid} --force</small>"
    return (f'<button data-sci-node-post="/sci-node/corrections/{cid}/accept" data-done="accepted">accept</button> '
            + reject)


def render_corrections(doc: dict[str, Any] | None) -> str:
    """HTML of the corrections block: counts, mean cord Dice over the last N accepted, per cord model,
    the last 20 with their sender, flags and accept/reject buttons."""
    esc = html.escape
    s = (doc or {}).get("summary") or {}
    if not s:
        return "<h2>Radiologists' corrections</h2><p>none yet</p>"
    mean = s.get("mean_cord_dice_last_n")
    heavy = s.get("heavily_corrected") or []
    head = (f"<p><b id=\"sci-node-corrections-review\">{int(s.get('to_review', 0))}</b> to review"
            f" ({int(s.get('flagged', 0))} flagged), {int(s.get('counted', 0))} accepted, "
            f"{int(s.get('rejected', 0))} rejected, {int(s.get('refused', 0))} refused; "
            f"mean cord Dice original vs corrected over the last {esc(str(s.get('window', '')))} accepted: "
            f"<b id=\"sci-node-corrections-dice\">{'-' if mean is None else f'{mean:.3f}'}</b></p>")
    if heavy:
        head += f'<p class="err">heavily corrected cord model(s): {esc(", ".join(map(str, heavy)))}</p>'
    models = "".join(f"<tr><td>cord {esc(str(v))}</td><td>{esc(str(d.get('n')))}</td>"
                     f"<td>{esc(str(d.get('mean_cord_dice')))}</td></tr>"
                     for v, d in (s.get("by_cord_model") or {}).items())
    cell: Callable[[Any], str] = lambda v: f"<td>{esc(str(v))}</td>"  # noqa: E731
    rows = "".join(
        f"<tr id=\"sci-node-correction-{esc(str(c.get('id')))}\">" + "".join(cell(v) for v in (
            c.get("id"), c.get("state"), (c.get("measures") or {}).get("cord_dice", ""),
            (c.get("measures") or {}).get("lesions_added", ""), (c.get("measures") or {}).get("lesions_removed", ""),
            c.get("sender") or "", c.get("reviewed_by") or "",
            c.get("reason") or "; ".join(c.get("flags") or []))) + f"<td>{_buttons(c)}</td></tr>"
        for c in ((doc or {}).get("corrections") or [])[:20])
    return (f"<h2>Radiologists' corrections</h2>{head}<table><tr><th>cord model</th><th>accepted</th>"
            f"<th>mean cord Dice</th></tr>{models}</table><p></p><table><tr><th>id</th><th>state</th><th>cord Dice</th>"
            f"<th>lesions added</th><th>removed</th><th>sent by</th><th>reviewed by</th><th>reason / flags</th>"
            f"<th></th></tr>{rows}</table>")
