"""sci-node's Orthanc Python plugin: a thin adapter between Orthanc and the sci-node DICOM node.

Loaded by Debian's ``orthanc-python`` (it embeds the system Python 3.11), configured by the
``"SciNode"`` section of the Orthanc configuration that :mod:`sci_node.app.stack` writes. It only
turns Orthanc events and HTTP requests into messages; nothing heavy runs in a callback
(callbacks run in Orthanc's core, under one GIL):

* ``STABLE_SERIES`` of a series whose Modality is in ``ForwardModalities`` (MR) and that did not
  come from the node itself -> an *asynchronous* Orthanc job ``POST /modalities/<node>/store``,
  recorded in the series' ``SciNodeForward`` metadata and in ``forwards.jsonl``. The node's own
  SEG/SR (Modality SEG/SR, RemoteAET = the node's AE title) are never forwarded, so nothing loops.
  After a restart, series that never became stable (Orthanc was stopped first) are forwarded too.
  A forward whose job failed (the node was down) is forwarded again with back-off, at most
  ``ForwardRetries`` times (``sci_node_forward_retry``), also when it failed before a restart.
* REST routes under ``/sci-node/`` (behind Orthanc's authentication like the rest of its API):

  ==========================================  ====================================================
  ``GET  /sci-node/``                          HTML status page (node jobs, forwards, OHIF links)
  ``GET  /sci-node/jobs``                      JSON: every node job + every forward
  ``GET  /sci-node/studies/<id>/jobs``         JSON: node jobs of one study (Orthanc id or UID)
  ``GET  /sci-node/series/<id>/jobs``          JSON: node jobs of one series (Orthanc id or UID)
  ``POST /sci-node/series/<id>/process``       (re)forward one series to the node now (same-origin JSON
                                               with the ``X-SCI-Node-CSRF`` token: ``sci_node_csrf``)
  ``GET  /sci-node/csrf``                      JSON: that token for the caller's login
  ``GET  /sci-node/corrections``               JSON: the node's corrections and their summary
  ``POST /sci-node/corrections/<id>/accept``   an admin accepts (or ``.../reject`` rejects) a pending
                                               correction, recorded as ``orthanc-user:<login>`` (CSRF
                                               as above; ``sci_node_corrections``)
  ``GET  /ohif/...``                           the OHIF viewer (``index.html`` for page routes)
  ==========================================  ====================================================

* ``STABLE_SERIES`` of a SEG series: each instance the node did not write (not from its AE
  title; not Manufacturer ``sci-node`` with a ``sci-node^`` ContentCreatorName) is handed to
  ``sci-node corrections ingest`` in a background thread with who stored it (the Orthanc user
  of a STOW-RS, or the AE title and address of a C-STORE): a radiologist's correction, pending an
  admin's review (docs/corrections.md, ``sci_node_corrections``).
* Orthanc Explorer gets "Open in OHIF", "(Re)process with sci-node" and "sci-node jobs" buttons.

The node's job status comes from the node's own CLI (``sci-node jobs --json``) run in a
background thread and cached for a few seconds, so the node's SQLite schema stays the node's.
Only the standard library is used; ``SitePackages`` (the venv's site-packages) is put on
``sys.path`` so the plugin could import the node's dependencies if it ever needs them.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import mimetypes
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

import orthanc  # provided by libOrthancPython.so

# this script's folder, for its sibling modules (orthanc-python loads the script by path)
_HERE = os.path.dirname(os.path.abspath(str(json.loads(orthanc.GetConfiguration()).get("PythonScript", ""))))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from sci_node_corrections import CorrectionHandoff, Uploaders, basic_user, render_corrections, review  # noqa: E402
from sci_node_csrf import CsrfGuard, page_script  # noqa: E402
from sci_node_forward_retry import ForwardRetrier, job_state_from  # noqa: E402

_UID_RE = re.compile(r"^[0-9.]{1,64}$")
_OID_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
_ASSET_RE = re.compile(r"\.[A-Za-z0-9]{1,8}$")  # a path with a file extension is an asset, not a route
_EXTRA_MIME = {".wasm": "application/wasm", ".js": "application/javascript", ".mjs": "application/javascript",
               ".json": "application/json", ".svg": "image/svg+xml", ".woff2": "font/woff2",
               ".map": "application/json", ".ico": "image/x-icon"}


def _status(output: Any, code: int, text: str) -> None:
    """An HTTP error status with a text body (the SDK wants a str and its length)."""
    output.SendHttpStatus(code, text, len(text.encode()))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _orthanc_log(level: str, message: str) -> None:
    {"error": orthanc.LogError, "warning": orthanc.LogWarning}.get(level, orthanc.LogInfo)(message)


class NodeJobs:
    """Cached answer of ``sci-node jobs --json``, refreshed in a background thread.

    Callbacks call :meth:`get`; it returns the cached list at once when it is fresh and otherwise
    waits at most ``wait_s`` for one refresh (the subprocess runs without holding the GIL).
    """

    def __init__(self, argv: list[str], ttl_s: float = 2.0, wait_s: float = 8.0, extract: Any = None) -> None:
        self._argv = argv
        # the answer's part that is kept: the job list (default), or e.g. ``lambda d: [d]``
        self._extract = extract or (lambda data: data.get("jobs", []) if isinstance(data, dict) else list(data))
        self._ttl = ttl_s
        self._wait = wait_s
        self._lock = threading.Condition()
        self._jobs: list[dict[str, Any]] = []
        self._error: str | None = "not queried yet"
        self._stamp = 0.0
        self._running = False

    def _refresh(self) -> None:
        jobs: list[dict[str, Any]] = []
        error: str | None = None
        try:
            proc = subprocess.run(self._argv, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                error = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            else:
                jobs = self._extract(json.loads(proc.stdout or "[]"))
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if error is None:
                self._jobs = [j for j in jobs if isinstance(j, dict)]
            self._error = error
            self._stamp = time.monotonic()
            self._running = False
            self._lock.notify_all()

    def get(self) -> tuple[list[dict[str, Any]], str | None]:
        """Return ``(jobs, error)``; ``error`` is None when the last query succeeded."""
        with self._lock:
            if time.monotonic() - self._stamp > self._ttl and not self._running:
                self._running = True
                threading.Thread(target=self._refresh, name="sci-node-jobs", daemon=True).start()
            if self._running:
                self._lock.wait_for(lambda: not self._running, timeout=self._wait)
            return list(self._jobs), self._error


def _job_field(job: dict[str, Any], *names: str) -> str:
    for name in names:
        if job.get(name):
            return str(job[name])
    return ""


def _when(job: dict[str, Any], *names: str) -> str:
    """A job timestamp (epoch seconds or text) as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    for name in names:
        value = job.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _dt.datetime.fromtimestamp(value, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if value:
            return str(value)
    return ""


def _job_study(job: dict[str, Any]) -> str:
    return _job_field(job, "study_uid", "study_instance_uid", "StudyInstanceUID")


def _job_series(job: dict[str, Any]) -> str:
    return _job_field(job, "series_uid", "series_instance_uid", "SeriesInstanceUID")


class SciNodePlugin:
    """Everything the plugin does, bound to the ``SciNode`` configuration section."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.modality = str(settings.get("NodeModality", "sci-node"))
        self.node_aet = str(settings.get("NodeAet", "SCINODE"))
        self.forward_modalities = {str(m).upper() for m in settings.get("ForwardModalities", ["MR"])}
        self.data_dir = str(settings.get("DataDir", ""))
        self.plugin_dir = str(settings.get("PluginStateDir", self.data_dir))
        self.ohif_dir = os.path.realpath(str(settings.get("OhifDist", "")))
        self.forward_log = os.path.join(self.plugin_dir, "forwards.jsonl")
        self.stable_age = float(settings.get("StableAge", 10))
        self.recovery_window = int(settings.get("RecoveryWindow", 10000))
        self._log_lock = threading.Lock()
        cli = settings.get("NodeCli", ["sci-node"])
        cli = [cli] if isinstance(cli, str) else list(cli)
        # the node's own configuration file, when the stack has one ([corrections] decides who may teach)
        node_flags = ["--data-dir", self.data_dir] + (["--config", str(settings["NodeConfig"])]
                                                      if settings.get("NodeConfig") else [])
        self.node_flags = node_flags
        self.jobs = NodeJobs(cli + ["jobs", "--json", *node_flags, "list", "--limit", "500"])
        self.corrections = NodeJobs(cli + ["corrections", "--json", *node_flags, "list"],
                                    extract=lambda data: [data] if isinstance(data, dict) else [])
        self.cli = cli
        self.uploaders = Uploaders(self.plugin_dir, trusted=bool(settings.get("AuthenticationEnabled", False)))
        self.handoff = CorrectionHandoff(cli, node_flags, self.plugin_dir, self.node_aet, self.uploaders)
        self.csrf = CsrfGuard()
        self.retrier = ForwardRetrier(
            job_state_from(orthanc.RestApiGet), lambda series, why, attempt: self.forward(series, why, attempt),
            _orthanc_log, retries=int(settings.get("ForwardRetries", 5)),
            first_s=float(settings.get("ForwardRetrySeconds", 5)),
            max_s=float(settings.get("ForwardRetryMaxSeconds", 300)))
        # the engine and its workers (``sci-node status --json``: Celery inspect takes up to a second)
        self.status = NodeJobs(cli + ["status", "--json", *node_flags], ttl_s=5.0,
                               extract=lambda data: [data] if isinstance(data, dict) else [])

    # -- forwarding -------------------------------------------------------------------------

    def on_change(self, change_type: Any, level: Any, resource_id: str) -> None:
        """Orthanc change callback: forward stable MR series; never raises."""
        if change_type == orthanc.ChangeType.ORTHANC_STARTED:
            try:  # only what Orthanc held before this start: later series take the normal path
                upto = int(json.loads(orthanc.RestApiGet("/changes?last")).get("Last", 0))
            except Exception as exc:  # noqa: BLE001
                orthanc.LogError(f"sci-node: recovery skipped: {exc!r}")
                return
            threading.Thread(target=self._recover, args=(upto,), name="sci-node-recover", daemon=True).start()
            self.retrier.start(self.forwards(with_state=False)[-2000:])
            return
        if change_type != orthanc.ChangeType.STABLE_SERIES:
            return
        try:
            self._consider_series(resource_id)
        except Exception as exc:  # noqa: BLE001 - a callback must never raise into Orthanc
            orthanc.LogError(f"sci-node: series {resource_id}: not forwarded: {exc!r}")

    def _recover(self, upto: int) -> None:
        """Forward the series Orthanc received but never saw become stable (it was stopped first).

        Orthanc forgets its stability timers when it stops, so a series still arriving then never
        gets ``STABLE_SERIES``. After one ``StableAge``, every series created in the last
        ``RecoveryWindow`` changes up to this start (change ``upto``) that is stable now (one
        that got new instances since is unstable and takes the normal path) and has no
        ``SciNodeForward`` record goes through the usual filter (MR, not from the node).
        """
        time.sleep(self.stable_age + 1)
        try:
            since = max(0, upto - self.recovery_window)
            changes = json.loads(orthanc.RestApiGet(f"/changes?since={since}&limit={self.recovery_window}"))
            series = dict.fromkeys(c["ID"] for c in changes.get("Changes", [])
                                   if c.get("ChangeType") == "NewSeries" and int(c.get("Seq", 0)) <= upto)
            for series_id in series:
                try:
                    orthanc.RestApiGet(f"/series/{series_id}/metadata/SciNodeForward")
                    continue  # forwarded already
                except Exception:  # noqa: BLE001 - no record (or the series is gone)
                    pass
                try:
                    self._consider_series(series_id, reason="recovered-after-restart")
                except Exception as exc:  # noqa: BLE001
                    orthanc.LogInfo(f"sci-node: series {series_id}: not recovered: {exc!r}")
        except Exception as exc:  # noqa: BLE001 - a background thread must not die loudly
            orthanc.LogError(f"sci-node: recovery scan failed: {exc!r}")

    def _consider_series(self, series_id: str, reason: str = "stable-series") -> None:
        series = json.loads(orthanc.RestApiGet(f"/series/{series_id}"))
        if reason != "stable-series" and not series.get("IsStable", True):
            return  # still receiving: STABLE_SERIES will come
        modality = str(series.get("MainDicomTags", {}).get("Modality", "")).upper()
        if modality == "SEG":  # a radiologist's corrected SEG? (the node's own are recognised and skipped)
            self.handoff.consider(series_id, series)
            return
        if modality not in self.forward_modalities:
            orthanc.LogInfo(f"sci-node: series {series_id} modality {modality!r}: not forwarded")
            return
        source = self._remote_aet(series.get("Instances", []))
        if source == self.node_aet:
            orthanc.LogWarning(f"sci-node: series {series_id} came from the node ({source}): not forwarded")
            return
        self.forward(series_id, reason=reason)

    @staticmethod
    def _remote_aet(instances: list[str]) -> str:
        if not instances:
            return ""
        try:
            return orthanc.RestApiGet(f"/instances/{instances[0]}/metadata/RemoteAET").decode().strip()
        except Exception:  # noqa: BLE001 - instances uploaded over HTTP have no RemoteAET
            return ""

    def forward(self, series_id: str, reason: str, attempt: int = 0) -> dict[str, Any]:
        """Queue an asynchronous C-STORE job of one series to the node, record it and watch it.

        ``attempt`` 0 is a forward of its own; n the n-th retry of a failed one (the retrier's).
        """
        body = json.dumps({"Resources": [series_id], "Asynchronous": True, "Permissive": False})
        job = json.loads(orthanc.RestApiPost(f"/modalities/{self.modality}/store", body))
        record = {"time": _now(), "series": series_id, "job": job.get("ID"), "reason": reason,
                  "modality": self.modality, "attempt": attempt}
        self.retrier.track(series_id, job.get("ID"), attempt)
        try:
            tags = json.loads(orthanc.RestApiGet(f"/series/{series_id}")).get("MainDicomTags", {})
            study = json.loads(orthanc.RestApiGet(f"/series/{series_id}/study")).get("MainDicomTags", {})
            record["series_uid"] = tags.get("SeriesInstanceUID", "")
            record["study_uid"] = study.get("StudyInstanceUID", "")
        except Exception:  # noqa: BLE001 - the record is best effort; the job is queued already
            pass
        orthanc.RestApiPut(f"/series/{series_id}/metadata/SciNodeForward", json.dumps(record).encode())
        with self._log_lock, open(self.forward_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        orthanc.LogWarning(f"sci-node: series {series_id} queued to {self.modality} (job {record['job']}, {reason})")
        return record

    def forwards(self, with_state: bool = True) -> list[dict[str, Any]]:
        """Every recorded forward, oldest first, with its Orthanc job's state (in-process query)."""
        try:
            with open(self.forward_log, encoding="utf-8") as fh:
                records = [json.loads(line) for line in fh if line.strip()]
        except FileNotFoundError:
            return []
        if with_state:
            for rec in records[-200:]:
                try:
                    rec["job_state"] = json.loads(orthanc.RestApiGet(f"/jobs/{rec['job']}")).get("State")
                except Exception:  # noqa: BLE001 - older than Orthanc's JobsHistorySize
                    rec["job_state"] = "unknown"
        return records

    # -- REST -------------------------------------------------------------------------------

    def _resolve(self, level: str, ident: str) -> tuple[str, str]:
        """Return ``(orthanc_id, dicom_uid)`` of a study/series given either one."""
        tag = "StudyInstanceUID" if level == "studies" else "SeriesInstanceUID"
        if _OID_RE.match(ident):
            info = json.loads(orthanc.RestApiGet(f"/{level}/{ident}"))
            return ident, info["MainDicomTags"][tag]
        if _UID_RE.match(ident):
            found = json.loads(orthanc.RestApiPost("/tools/lookup", ident.encode()))
            for item in found:
                if item.get("Type", "").lower() == ("study" if level == "studies" else "series"):
                    return item["ID"], ident
            return "", ident
        raise ValueError(f"{ident!r} is neither an Orthanc id nor a DICOM UID")

    def rest_jobs(self, output: Any, uri: str, **request: Any) -> None:
        """``GET /sci-node/jobs`` and ``GET /sci-node/{studies,series}/<id>/jobs``."""
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        groups = request.get("groups") or ()
        jobs, error = self.jobs.get()
        forwards = self.forwards()
        answer: dict[str, Any] = {}
        if len(groups) == 2 and groups[0]:
            level, ident = groups
            try:
                oid, uid = self._resolve(level, ident)
            except (ValueError, KeyError) as exc:
                _status(output, 400, str(exc))
                return
            except Exception:  # noqa: BLE001 - Orthanc raises on unknown resources
                _status(output, 404, f"no {level} {ident}")
                return
            pick = _job_study if level == "studies" else _job_series
            key = "study_uid" if level == "studies" else "series_uid"
            jobs = [j for j in jobs if pick(j) == uid]
            forwards = [f for f in forwards if f.get(key) == uid]
            answer = {"level": level, "orthanc_id": oid, "uid": uid}
        answer.update({"jobs": jobs, "forwards": forwards, "node_error": error})
        output.AnswerBuffer(json.dumps(answer, indent=1), "application/json")

    def csrf_refused(self, output: Any, uri: str, request: dict[str, Any]) -> bool:
        """Answer and log a POST that may not start work (``sci_node_csrf``); True when refused."""
        refusal = self.csrf.refusal(request)
        if refusal is None:
            return False
        orthanc.LogWarning(f"sci-node: POST {uri} refused: {refusal[1]}")
        _status(output, *refusal)
        return True

    def rest_csrf(self, output: Any, uri: str, **request: Any) -> None:
        """``GET /sci-node/csrf``: the ``X-SCI-Node-CSRF`` token of the caller's login (JSON)."""
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        output.SetHttpHeader("Cache-Control", "no-store")
        output.AnswerBuffer(json.dumps({"header": "X-SCI-Node-CSRF", "token": self.csrf.token(request)}),
                            "application/json")

    def rest_process(self, output: Any, uri: str, **request: Any) -> None:
        """``POST /sci-node/series/<id>/process``: (re)forward one series to the node."""
        if request["method"] != "POST":
            output.SendMethodNotAllowed("POST")
            return
        if self.csrf_refused(output, uri, request):
            return
        try:
            oid, _uid = self._resolve("series", request["groups"][0])
        except Exception as exc:  # noqa: BLE001
            _status(output, 404, f"no series {request['groups'][0]}: {exc}")
            return
        if not oid:
            _status(output, 404, f"no series {request['groups'][0]}")
            return
        record = self.forward(oid, reason="manual")
        output.AnswerBuffer(json.dumps(record), "application/json")

    def corrections_doc(self) -> tuple[dict[str, Any], str | None]:
        """``sci-node corrections list --json`` (cached): ``({"corrections": [...], "summary": {...}}, error)``."""
        docs, error = self.corrections.get()
        return (docs[0] if docs else {"corrections": [], "summary": {}}), error

    def rest_corrections(self, output: Any, uri: str, **request: Any) -> None:
        """``GET /sci-node/corrections``: the node's corrections and their summary (JSON)."""
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        doc, error = self.corrections_doc()
        output.AnswerBuffer(json.dumps(dict(doc, node_error=error), indent=1), "application/json")

    def rest_review(self, output: Any, uri: str, **request: Any) -> None:
        """``POST /sci-node/corrections/<id>/accept|reject``: an admin's decision, recorded with their login."""
        if request["method"] != "POST":
            output.SendMethodNotAllowed("POST")
            return
        if self.csrf_refused(output, uri, request):
            return
        cid, action = request["groups"]
        user = basic_user(request.get("headers") or {})
        code, answer = review(self.cli, self.node_flags, cid, action, user)
        orthanc.LogWarning(f"sci-node: correction {cid} {action} by {user or 'unknown'}: HTTP {code}")
        if code != 200:
            _status(output, code, answer)
            return
        output.AnswerBuffer(answer, "application/json")

    def rest_status_page(self, output: Any, uri: str, **request: Any) -> None:
        """``GET /sci-node/``: a small self-refreshing HTML page."""
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        jobs, error = self.jobs.get()
        output.SetHttpHeader("Cache-Control", "no-store")
        corrections, _cerr = self.corrections_doc()
        status, _serr = self.status.get()
        engine = (status[0] if status else {}).get("engine")
        output.AnswerBuffer(render_status_page(jobs, error, self.forwards()[-50:], corrections, engine,
                                               csrf_token=self.csrf.token(request)),
                            "text/html; charset=utf-8")

    # -- OHIF -------------------------------------------------------------------------------

    def serve_ohif(self, output: Any, uri: str, **request: Any) -> None:
        """``GET /ohif/<path>``: a file of the OHIF dist, or ``index.html`` for a page route."""
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        groups = request.get("groups") or ("",)  # "/ohif" (Orthanc strips the trailing slash)
        rel = urllib.parse.unquote(groups[0] or "")
        path = os.path.realpath(os.path.join(self.ohif_dir, rel))
        if not os.path.isdir(self.ohif_dir):
            _status(output, 503, "OHIF is not installed: run scripts/install_ohif.sh")
            return
        if not (path == self.ohif_dir or path.startswith(self.ohif_dir + os.sep)):
            output.SendHttpStatusCode(403)
            return
        if not os.path.isfile(path):
            if _ASSET_RE.search(rel):
                output.SendHttpStatusCode(404)
                return
            path = os.path.join(self.ohif_dir, "index.html")  # SPA page route: /ohif/viewer?...
        name = os.path.basename(path)
        ext = os.path.splitext(name)[1].lower()
        mime = _EXTRA_MIME.get(ext) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        hashed = re.search(r"\.[0-9a-f]{16}\.", name) is not None or ext == ".wasm"
        output.SetHttpHeader("Cache-Control", "private, max-age=86400" if hashed else "no-cache")
        with open(path, "rb") as fh:
            output.AnswerBuffer(fh.read(), mime)


def render_engine(engine: dict[str, Any] | None) -> str:
    """HTML of the engine block: local, or the celery broker, its workers and what is out per worker."""
    esc = html.escape
    if not engine or engine.get("kind") != "celery":
        return '<h2>Engine</h2><p id="sci-node-engine">local: the models run in the node</p>'
    out = engine.get("out_per_worker") or {}
    rows = "".join(
        f"<tr><td>{esc(str(w.get('name')))}</td><td>{'connected' if w.get('connected') else 'not answering'}</td>"
        f"<td>{esc(str(w.get('host')))}</td><td>{esc(str(w.get('queue')))}</td><td>{esc(str(w.get('device')))}</td>"
        f"<td>{esc(', '.join(map(str, w.get('running_jobs') or [])) or '-')}</td>"
        f"<td>{esc(str(out.get(w.get('name'), 0)))}</td></tr>" for w in engine.get("workers") or [])
    err = f'<p class="err">workers unknown: {esc(str(engine["workers_error"]))}</p>' \
        if engine.get("workers_error") else ""
    dispatches = ", ".join(f"{esc(str(k))} {esc(str(v))}" for k, v in sorted((engine.get("dispatches") or {}).items()))
    return (f'<h2>Engine</h2><p id="sci-node-engine">celery: broker {esc(str(engine.get("broker")))}, queue '
            f'{esc(str(engine.get("queue")))}; dispatches: {dispatches or "none"}; queued (no worker yet): '
            f'{esc(str(out.get("(queued)", 0)))}</p>{err}<table><tr><th>worker</th><th>state</th><th>host</th>'
            f'<th>queue</th><th>device</th><th>running jobs</th><th>jobs out</th></tr>'
            f'{rows or "<tr><td colspan=7>no worker connected</td></tr>"}</table>')


def ohif_href(study_uid: str, job: dict[str, Any] | None = None) -> str:
    """The OHIF link of a study; with a job whose report was written, OHIF opens that report (SR):
    on the largest lesion, or on the slice with the most cord (the job's ``summary.key_images``)."""
    url = f"/ohif/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"
    keys = (((job or {}).get("result") or {}).get("summary") or {}).get("key_images") or {}
    sr = keys.get("sr_series_uid") if isinstance(keys, dict) else None
    return url + (f"&initialSeriesInstanceUID={urllib.parse.quote(str(sr))}" if sr else "")


def findings_text(job: dict[str, Any]) -> str:
    """``"cord C2-C5; 2 lesions (C3, C4)"`` from a job's summary; the reason when the levels are unknown."""
    summary = (job.get("result") or {}).get("summary") or {}
    if not summary:
        return ""
    names = [str(v.get("level")) for v in summary.get("vertebral_levels") or [] if v.get("level")]
    if names:
        cord = f"cord {names[0]}" + (f"-{names[-1]}" if names[-1] != names[0] else "")
    else:
        why = summary.get("vertebral_levels_unknown_reason")
        cord = f"levels unknown ({why})" if why else "levels unknown"
    count = summary.get("lesion_count")
    fu = summary.get("followup") or {}
    since = ""
    if fu:
        counts = fu.get("counts") or {}
        since = ("; vs prior: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("new", "enlarging", "resolved"))
                 if fu.get("compared") else "; vs prior: pending (PACS)" if fu.get("pending")
                 else "; vs prior: not compared")
    if count is None:
        return cord + since
    sites = sorted({str(level) for les in summary.get("lesions") or [] for level in les.get("vertebral_levels") or []},
                   key=lambda n: names.index(n) if n in names else len(names))
    return (f"{cord}; {count} lesion{'s' if count != 1 else ''}" + (f" ({', '.join(sites)})" if sites else "")
            + since)


def render_status_page(jobs: list[dict[str, Any]], error: str | None, forwards: list[dict[str, Any]],
                       corrections: dict[str, Any] | None = None, engine: dict[str, Any] | None = None,
                       csrf_token: str = "") -> str:
    """HTML of the status page: node jobs (newest first), Orthanc's forwards, the corrections, the engine."""
    esc = html.escape
    rows = []
    for job in jobs[:200]:
        study = _job_study(job)
        link = f'<a href="{esc(ohif_href(study, job))}">open in OHIF</a>' if study else ""
        rows.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
            _job_field(job, "id", "job_id"), _job_field(job, "state", "status"), _job_field(job, "delivery"),
            _job_field(job, "reason", "error"), findings_text(job), _job_series(job),
            _when(job, "created_at", "created", "queued_at"),
            _when(job, "finished_at", "updated_at", "finished"))) + f"<td>{link}</td></tr>")
    frows = [f"<tr><td>{esc(str(f.get('time', '')))}</td><td>{esc(str(f.get('reason', '')))}</td>"
             f"<td>{esc(str(f.get('series_uid', f.get('series', ''))))}</td><td>{esc(str(f.get('job', '')))}</td>"
             f"<td>{esc(str(f.get('job_state', '')))}</td>"
             f"<td><a href=\"/ohif/viewer?StudyInstanceUIDs={urllib.parse.quote(str(f.get('study_uid', '')))}\">"
             "open in OHIF</a></td>"
             f"<td><button data-sci-node-post=\"/sci-node/series/{esc(str(f.get('series', '')))}/process\">"
             "reprocess</button></td></tr>" for f in reversed(forwards)]
    note = f'<p class="err">node status unavailable: {esc(error)}</p>' if error else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sci-node status</title>
<meta http-equiv="refresh" content="10"><style>
body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}
.err{{color:#a00}}</style>{page_script(csrf_token)}</head><body>
<h1>sci-node</h1><p><a href="/app/explorer.html">Orthanc Explorer</a> · <a href="/ohif/">OHIF study list</a>
· <a href="/sci-node/jobs">JSON</a></p>{note}
<h2>Node jobs</h2><table><tr><th>job</th><th>state</th><th>delivery</th><th>reason</th><th>findings (vertebral levels)</th><th>series UID</th><th>created (UTC)</th>
<th>finished (UTC)</th><th></th></tr>{''.join(rows) or '<tr><td colspan="9">no jobs yet</td></tr>'}</table>
<h2>Series forwarded by Orthanc</h2><table><tr><th>time</th><th>why</th><th>series UID</th><th>Orthanc job</th><th>job state</th><th></th><th></th></tr>
{''.join(frows) or '<tr><td colspan="7">none yet</td></tr>'}</table>
{render_engine(engine)}
{render_corrections(corrections)}</body></html>"""  # noqa: E501 (HTML, served as written)


EXPLORER_JS = r"""
(function () {
  function addButton(pageId, anchorId, buttonId, label, icon, onClick) {
    $(pageId).live('pagebeforecreate', function () {
      var b = $('<a>').attr('id', buttonId).attr('data-role', 'button').attr('href', '#')
        .attr('data-icon', icon).attr('data-theme', 'e').text(label);
      b.insertBefore($(anchorId).parent().parent());
      b.click(function (e) { e.preventDefault(); if ($.mobile.pageData) { onClick($.mobile.pageData.uuid); } });
    });
  }
  addButton('#study', '#study-delete', 'sci-node-ohif-study', 'Open in OHIF (sci-node)', 'search', function (uuid) {
    // on the newest report of the study (jobs come newest first), as the status page's links
    $.ajax({ url: '../sci-node/studies/' + uuid + '/jobs', dataType: 'json', cache: false, success: function (r) {
      var sr = (r.jobs || []).map(function (j) { return (((j.result || {}).summary || {}).key_images || {}).sr_series_uid; })
        .filter(Boolean)[0];
      window.open('../ohif/viewer?StudyInstanceUIDs=' + r.uid + (sr ? '&initialSeriesInstanceUID=' + sr : ''));
    }});
  });
  addButton('#series', '#series-delete', 'sci-node-process-series', '(Re)process with sci-node', 'refresh', function (uuid) {
    $.ajax({ url: '../sci-node/csrf', dataType: 'json', cache: false, success: function (t) {
      $.ajax({ url: '../sci-node/series/' + uuid + '/process', type: 'POST', dataType: 'json',
        contentType: 'application/json', data: '{}', headers: { 'X-SCI-Node-CSRF': t.token },
        success: function (r) { alert('Queued for sci-node (Orthanc job ' + r.job + ')'); },
        error: function (x) { alert('sci-node: ' + x.status + ' ' + x.responseText); } });
    }});
  });
  $('#lookup').live('pagebeforecreate', function () {
    if ($('#sci-node-status-link').length) { return; }
    $('<p>').append($('<a>').attr('href', '../sci-node/').attr('data-ajax', 'false').attr('id', 'sci-node-status-link')
      .text('sci-node jobs and status')).prependTo($('#lookup div[data-role=content]'));
  });
})();
"""  # noqa: E501 (JavaScript, served as written)


def _install() -> None:
    config = json.loads(orthanc.GetConfiguration())
    settings = dict(config.get("SciNode", {}), StableAge=config.get("StableAge", 60),
                    AuthenticationEnabled=config.get("AuthenticationEnabled", False))
    site = settings.get("SitePackages")
    if site and site not in sys.path:
        sys.path.insert(0, str(site))  # the venv's site-packages (same Python 3.11 ABI)
    plugin = SciNodePlugin(settings)
    orthanc.RegisterOnChangeCallback(plugin.on_change)
    orthanc.RegisterRestCallback("/sci-node", plugin.rest_status_page)  # Orthanc strips "/"
    orthanc.RegisterRestCallback("/sci-node/jobs", plugin.rest_jobs)
    orthanc.RegisterRestCallback("/sci-node/(studies|series)/([^/]+)/jobs", plugin.rest_jobs)
    orthanc.RegisterRestCallback("/sci-node/series/([^/]+)/process", plugin.rest_process)
    orthanc.RegisterRestCallback("/sci-node/csrf", plugin.rest_csrf)
    orthanc.RegisterRestCallback("/sci-node/corrections", plugin.rest_corrections)
    orthanc.RegisterRestCallback("/sci-node/corrections/([0-9]{1,12})/(accept|reject)", plugin.rest_review)
    orthanc.RegisterIncomingHttpRequestFilter(plugin.uploaders.on_request)
    orthanc.RegisterOnStoredInstanceCallback(plugin.uploaders.on_stored)
    orthanc.RegisterRestCallback("/ohif", plugin.serve_ohif)
    orthanc.RegisterRestCallback("/ohif/(.*)", plugin.serve_ohif)
    orthanc.ExtendOrthancExplorer(EXPLORER_JS)
    orthanc.LogWarning(f"sci-node plugin: forwarding {sorted(plugin.forward_modalities)} series to "
                       f"modality {plugin.modality!r} ({plugin.node_aet}); OHIF from {plugin.ohif_dir}")


_install()
