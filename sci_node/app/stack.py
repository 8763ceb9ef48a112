"""The embedded deployment: Orthanc (PACS + DICOMweb + OHIF) and the node, wired on loopback.

``sci-node stack`` runs both as child processes until Ctrl-C/SIGTERM::

    scanner --C-STORE--> Orthanc (DicomAet ORTHANC, --dicom-port on [stack] dicom_bind; only the node
                           |  and [stack] scanners, by AE title and address; DICOM TLS with [stack.tls])
                           | STABLE_SERIES of an MR series (plugin orthanc/plugin/sci_node_plugin.py)
                           v  asynchronous job POST /modalities/sci-node/store
                         sci-node serve (cfg.ae_title, 127.0.0.1:--node-port, allows ORTHANC only)
                           | DICOM-SEG + SR, C-STORE
                           v
                         Orthanc, same study  --DICOMweb /dicom-web/-->  OHIF under /ohif/

Layout in the data directory ``D`` (the node keeps its own spool and index in ``D`` too, so
``sci-node status --data-dir D`` works unchanged)::

    D/orthanc/orthanc.json        generated from orthanc/orthanc.json.in (mode 0600: it holds the password)
    D/orthanc/credentials.json    generated HTTP credentials (mode 0600), only when none were given
    D/orthanc/storage/            Orthanc's storage and index
    D/orthanc/forwards.jsonl      the plugin's record of every forward to the node
    D/orthanc/bind_address.so     the shim that binds Orthanc's DICOM port to [stack] dicom_bind
    D/orthanc/dicom-tls-trusted.pem  with [stack.tls]: ca_file + Orthanc's certificate (mode 0600)
    D/logs/orthanc.log, node.log  the children's logs

Orthanc 1.10 cannot bind its DICOM port to one address: the stack preloads a shim that does
(:mod:`sci_node.app.stack_dicom`; loopback unless ``[stack] dicom_bind`` says otherwise) and checks the
listening socket. Orthanc's HTTP server only *answers* loopback clients unless ``RemoteAccessAllowed``.
The stack supervises both children (:mod:`sci_node.app.stack_supervisor`): one that dies is restarted
with back-off.

:func:`run_demo` starts the same stack, sends the committed sample series with dcmtk's
``storescu``, waits for the SEG in that study and prints the OHIF URL.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from sci_node.app.stack_dicom import (
    check_dicom_listener,
    dicom_modalities,
    node_tls_args,
    orthanc_env,
    tls_values,
    trust_bundle_path,
    write_trust_bundle,
)
from sci_node.app.stack_supervisor import RestartPolicy, Supervisor
from sci_node.config import REPO_ROOT, NodeConfig, Scanner
from sci_node.errors import ConfigError, StackError
from sci_node.logs import get_logger
from sci_node.store.private_files import make_private_dirs, restrict_umask

log = get_logger(__name__)

ORTHANC_DIR = REPO_ROOT / "orthanc"
CONFIG_TEMPLATE = ORTHANC_DIR / "orthanc.json.in"
PLUGIN_SCRIPT = ORTHANC_DIR / "plugin" / "sci_node_plugin.py"
OHIF_DIST = ORTHANC_DIR / "ohif-dist"
SAMPLE_DIR = REPO_ROOT / "sample"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"),
               Path("/usr/local/share/orthanc/plugins"))
ORTHANC_AET = "ORTHANC"
NODE_MODALITY = "sci-node"
DEFAULT_USER = "scinode"
NODE_STABLE_SECONDS = 2.0  # Orthanc already waited StableAge; the node only waits out the forward
#: the calling AE title ``sci-node demo`` sends the sample series as (allowed from 127.0.0.1 by the demo)
DEMO_AET = "SCIDEMO"


@dataclass(frozen=True)
class StackPorts:
    """TCP ports of the stack: Orthanc HTTP, Orthanc DICOM, the node's DICOM."""

    http: int = 8042
    dicom: int = 4242
    node: int = 11112

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming every bad or clashing port."""
        bad = [f"{k} port {v} is not in 1..65535" for k, v in vars(self).items() if not 0 < v < 65536]
        if len({self.http, self.dicom, self.node}) != 3:
            bad.append(f"ports must differ (http {self.http}, dicom {self.dicom}, node {self.node})")
        if bad:
            raise ConfigError("invalid stack ports: " + "; ".join(bad))


@dataclass(frozen=True)
class OrthancCredentials:
    """Orthanc's HTTP user; the password never appears in ``repr``."""

    user: str
    password: str = field(repr=False)
    file: Path | None = None  # where they are stored, when generated
    generated: bool = False  # True only on the run that created them


def resolve_credentials(state_dir: Path, user: str | None, password: str | None) -> OrthancCredentials:
    """Return the credentials given, or the stored ones, or new ones stored with mode 0600.

    Parameters
    ----------
    state_dir
        ``D/orthanc``; ``credentials.json`` lives there.
    user, password
        From the command line edge (``SCI_ORTHANC_USER`` / ``SCI_ORTHANC_PASSWORD``); both or
        neither.

    Raises
    ------
    ConfigError
        Only one of user/password given, or a stored file that is unreadable or not mode 0600.
    """
    if bool(user) != bool(password):
        raise ConfigError("Orthanc credentials: give both user and password (SCI_ORTHANC_USER and "
                          "SCI_ORTHANC_PASSWORD) or neither")
    if user and password:
        if ":" in user:
            raise ConfigError(f"Orthanc user {user!r} must not contain ':'")
        return OrthancCredentials(user, password)
    path = state_dir / "credentials.json"
    make_private_dirs(state_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_credentials(path)
    creds = OrthancCredentials(DEFAULT_USER, secrets.token_urlsafe(18), path, generated=True)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"user": creds.user, "password": creds.password}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return creds


def _read_credentials(path: Path) -> OrthancCredentials:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"credentials file {str(path)!r} has mode {mode:o}: must be 600 (chmod 600 it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return OrthancCredentials(str(data["user"]), str(data["password"]), path)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"credentials file {str(path)!r} is not valid ({exc}); delete it to regenerate") from None


# -- Orthanc configuration ------------------------------------------------------------------

def find_orthanc_plugin(name: str) -> Path:
    """Path of an Orthanc plugin library (``libOrthancPython.so`` ...) in the Debian locations."""
    for folder in PLUGIN_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise StackError(f"Orthanc plugin {name} not found in {', '.join(map(str, PLUGIN_DIRS))}: "
                     "install orthanc-python and orthanc-dicomweb (bash scripts/install.sh)")


def render_orthanc_config(template: str, values: dict[str, Any]) -> dict[str, Any]:
    """Fill ``@NAME@`` placeholders of the template with JSON-encoded values and parse it.

    Raises
    ------
    StackError
        A placeholder left unfilled or a template that does not parse.
    """
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", json.dumps(value))
    left = sorted(set(re.findall(r"@([A-Z_]+)@", text)))
    if left:
        raise StackError(f"Orthanc config template: unfilled placeholders {left}")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StackError(f"Orthanc config template does not parse after filling: {exc}") from None


def orthanc_config_values(cfg: NodeConfig, ports: StackPorts, creds: OrthancCredentials,
                          config_file: Path | None = None) -> dict[str, Any]:
    """The placeholder values of ``orthanc/orthanc.json.in`` for this stack."""
    state = cfg.data_dir / "orthanc"
    st = cfg.stack
    return {
        **tls_values(cfg, state),
        "DICOM_MODALITIES": dicom_modalities(cfg, NODE_MODALITY, ports.node),
        "FORWARD_RETRIES": st.forward_retries,
        "FORWARD_RETRY_SECONDS": st.forward_retry_seconds,
        "FORWARD_RETRY_MAX_SECONDS": st.forward_retry_max_seconds,
        "STORAGE_DIR": str(state / "storage"),
        "DICOMWEB_PLUGIN": str(find_orthanc_plugin("libOrthancDicomWeb.so")),
        "PYTHON_PLUGIN": str(find_orthanc_plugin("libOrthancPython.so")),
        "HTTP_PORT": ports.http,
        "REMOTE_ACCESS": cfg.bind not in ("127.0.0.1", "localhost", "::1"),
        "REGISTERED_USERS": {creds.user: creds.password},
        "DICOM_PORT": ports.dicom,
        "NODE_MODALITY": NODE_MODALITY,
        "NODE_AET": cfg.ae_title,
        "STABLE_AGE": max(1, math.ceil(cfg.stable_seconds)),
        "PLUGIN_SCRIPT": str(PLUGIN_SCRIPT),
        "NODE_DATA_DIR": str(cfg.data_dir),
        "PLUGIN_STATE_DIR": str(state),
        "NODE_CLI": [sys.executable, "-m", "sci_node.cli"],
        "NODE_CONFIG": str(config_file) if config_file else None,
        "SITE_PACKAGES": sysconfig.get_paths()["purelib"],
        "OHIF_DIST": str(OHIF_DIST),
    }


def write_orthanc_config(cfg: NodeConfig, ports: StackPorts, creds: OrthancCredentials,
                         config_file: Path | None = None) -> Path:
    """Write ``D/orthanc/orthanc.json`` (mode 0600) and create Orthanc's storage folder.

    ``config_file`` is the node's TOML file, handed to the plugin's ``sci-node`` calls (who may
    hand in corrections is ``[corrections]``'s decision).
    """
    state = cfg.data_dir / "orthanc"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / "storage").mkdir(mode=0o700, exist_ok=True)
    write_trust_bundle(cfg, state)
    config = render_orthanc_config(CONFIG_TEMPLATE.read_text(encoding="utf-8"),
                                   orthanc_config_values(cfg, ports, creds, config_file))
    path = state / "orthanc.json"
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


# -- processes ------------------------------------------------------------------------------

def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass(frozen=True)
class StackSpec:
    """What :class:`Stack` starts: the node config, ports, credentials and optional TOML file."""

    cfg: NodeConfig
    ports: StackPorts
    creds: OrthancCredentials
    config_file: Path | None = None
    orthanc_bin: str = "Orthanc"


class Stack:
    """Orthanc and ``sci-node serve`` as supervised child processes; a context manager that stops both."""

    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.log_dir = spec.cfg.data_dir / "logs"
        self.children = Supervisor(self.log_dir, RestartPolicy.from_config(spec.cfg.stack), REPO_ROOT,
                                   preexec=die_with_parent)

    @property
    def url(self) -> str:
        """Orthanc's base URL on loopback."""
        return f"http://127.0.0.1:{self.spec.ports.http}"

    def client(self, timeout: float = 30.0) -> Any:
        """A pyorthanc client logged in with the stack's credentials."""
        from pyorthanc import Orthanc  # type: ignore[import-untyped]

        return Orthanc(self.url, username=self.spec.creds.user, password=self.spec.creds.password,
                       timeout=timeout, trust_env=False)

    def node_argv(self) -> list[str]:
        """``sci-node serve`` wired to this Orthanc."""
        cfg, ports = self.spec.cfg, self.spec.ports
        argv = [sys.executable, "-m", "sci_node.cli", "serve",
                "--data-dir", str(cfg.data_dir), "--models-dir", str(cfg.models_dir),
                "--ae-title", cfg.ae_title, "--port", str(ports.node), "--bind", "127.0.0.1",
                "--destination", f"{ORTHANC_AET}@127.0.0.1:{ports.dicom}", "--allow-ae", f"{ORTHANC_AET}@127.0.0.1",
                "--stable-seconds", str(min(cfg.stable_seconds, NODE_STABLE_SECONDS)),
                "--workers", str(cfg.workers), "--device", cfg.device,
                "--log-format", "json", "--log-level", cfg.log_level,
                *node_tls_args(cfg, cfg.data_dir / "orthanc")]
        if self.spec.config_file is not None:
            argv += ["--config", str(self.spec.config_file)]
        if cfg.followup.pacs is None:  # the prior of a follow-up: this Orthanc holds every earlier study
            argv += ["--followup-pacs", f"{ORTHANC_AET}@127.0.0.1:{ports.dicom}"]
        return argv

    def start(self) -> None:
        """Write Orthanc's config and start Orthanc, then the node."""
        self.spec.ports.validate()
        exe = shutil.which(self.spec.orthanc_bin) or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
        if exe is None:
            raise StackError("Orthanc is not installed (no 'Orthanc' executable): run bash scripts/install.sh")
        conf = write_orthanc_config(self.spec.cfg, self.spec.ports, self.spec.creds, self.spec.config_file)
        # dcmtk inside Orthanc waits ~40-90 ms per instance on Nagle/delayed ACK without this.
        env = orthanc_env(self.spec.cfg, self.spec.ports.dicom, conf.parent, dict(os.environ, TCP_NODELAY="1"))
        self.children.start("orthanc", [exe, str(conf)], env)
        node_env = dict(os.environ, PYTHONUNBUFFERED="1")
        node_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), node_env.get("PYTHONPATH")]))
        self.children.start("node", self.node_argv(), node_env)

    def check_alive(self) -> None:
        """Raise :class:`StackError` (with the log tail) when a child has exited (while starting)."""
        self.children.poll(restart=False)

    def supervise(self) -> None:
        """Restart a child that has exited, with back-off; raise :class:`StackError` when giving up."""
        self.children.poll(restart=True)

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines of a child's log file."""
        return self.children.log_tail(name, lines)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until Orthanc answers ``/system`` and C-ECHOes the node through its modality entry."""
        import httpx
        from pyorthanc import Orthanc  # type: ignore[import-untyped]

        deadline = time.monotonic() + timeout
        raw = Orthanc(self.url, username=self.spec.creds.user, password=self.spec.creds.password,
                      return_raw_response=True, timeout=10.0, trust_env=False)
        for what, probe in (("orthanc", lambda: raw.get_system()),
                            ("node", lambda: raw.post_modalities_id_echo(NODE_MODALITY, json={}))):
            while True:
                self.check_alive()
                try:
                    status, detail = probe().status_code, ""
                except httpx.HTTPError as exc:
                    status, detail = 0, str(exc)
                if status == 401:
                    raise StackError(f"Orthanc at {self.url} rejected our credentials: is another "
                                     "Orthanc running on that port?")
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"{what} not ready after {timeout:.0f} s ({status or detail}); last log "
                                     f"lines:\n{self.log_tail(what)}")
                time.sleep(0.3)
            if what == "orthanc":
                check_dicom_listener(self.spec.cfg, self.spec.ports.dicom)
            log.info("stack_child_ready", child=what)

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM the node, then Orthanc; SIGKILL what has not exited after ``timeout``."""
        return self.children.stop(("node", "orthanc"), timeout)

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the two commands -----------------------------------------------------------------------

def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def ohif_study_url(base_url: str, study_uid: str, initial_series_uid: str | None = None) -> str:
    """URL that opens one study in the OHIF viewer served by Orthanc.

    ``initial_series_uid`` is the series OHIF shows first. The node's SR: OHIF's SR view, on the
    largest lesion or, without lesions, on the slice with the most cord (the report lists that
    finding first, :mod:`sci_node.pipeline.key_slices`), each finding outlined with its numbers. The SEG:
    overlaid on the MR it references (``disableConfirmationPrompts`` in our app-config skips the
    "open it?" prompt), on the first slice with any segmentation (OHIF 3.13 picks that slice).
    """
    url = f"{base_url}/ohif/viewer?StudyInstanceUIDs={study_uid}"
    return url + (f"&initialSeriesInstanceUID={initial_series_uid}" if initial_series_uid else "")


def _say_viewer_links(out: TextIO, stack: Stack, client: Any, study_uid: str, seg_uid: str) -> None:
    """Print the OHIF links of the demo study: its report (SR) view, and the SEG over the MR."""
    try:
        srs = wait_for_modality(client, study_uid, "SR", 120.0, alive=stack.supervise)
        sr_uid = client.get_series_id(srs[-1])["MainDicomTags"]["SeriesInstanceUID"]
    except StackError:  # no report came: the SEG view is all there is
        sr_uid = None
    login = f"log in as {stack.spec.creds.user!r}"
    if sr_uid:
        _say(out, f"OHIF ({login}), the report on the largest lesion or the slice with the most cord: "
                  f"{ohif_study_url(stack.url, study_uid, sr_uid)}")
    _say(out, f"OHIF ({login}), the segmentation over the MR: {ohif_study_url(stack.url, study_uid, seg_uid)}")


def _dicom_line(cfg: NodeConfig, port: int) -> str:
    st = cfg.stack
    where = "every interface" if st.dicom_bind == "0.0.0.0" else st.dicom_bind
    scanners = ", ".join(map(str, st.scanners)) or "none yet: add one with --scanner AET@IP or [stack] scanners"
    return (f"DICOM {ORTHANC_AET} port {port} on {where}{', DICOM TLS' if st.tls.enabled else ''}; accepts the node "
            f"and scanners: {scanners}")


def _announce(stack: Stack, out: TextIO) -> None:
    spec, url = stack.spec, stack.url
    creds = spec.creds
    _say(out, "sci-node stack is up")
    _say(out, f"  Orthanc (PACS):   {url}/app/explorer.html")
    _say(out, f"  Orthanc DICOM:    {_dicom_line(spec.cfg, spec.ports.dicom)}")
    ohif = f"{url}/ohif/" if (OHIF_DIST / "index.html").is_file() else \
        "not installed (run scripts/install_ohif.sh)"
    _say(out, f"  OHIF viewer:      {ohif}")
    _say(out, f"  sci-node status:  {url}/sci-node/")
    _say(out, f"  node:             {spec.cfg.ae_title}@127.0.0.1:{spec.ports.node} (accepts {ORTHANC_AET} only)")
    if creds.generated:
        _say(out, f"  login:            user {creds.user!r} password {creds.password!r} "
                  f"(generated once; stored mode 0600 in {creds.file})")
    elif creds.file is not None:
        _say(out, f"  login:            user {creds.user!r}, password in {creds.file}")
    else:
        _say(out, f"  login:            user {creds.user!r} (password as given)")
    _say(out, f"  logs:             {stack.log_dir}")
    first = spec.cfg.stack.scanners[0] if spec.cfg.stack.scanners else Scanner("AET", "IP")
    _say(out, f"  send MR series:   storescu -aet {first.ae_title} -aec {ORTHANC_AET} {_send_host(spec.cfg)} "
              f"{spec.ports.dicom} FILES...   (from {first.host})")


def _send_host(cfg: NodeConfig) -> str:
    """The address a local sender reaches Orthanc's DICOM port at."""
    return "127.0.0.1" if cfg.stack.dicom_bind == "0.0.0.0" else cfg.stack.dicom_bind


def _run_until_signal(stack: Stack, out: TextIO) -> int:
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        _say(out, "Ctrl-C stops both.")
        while not stop.wait(1.0):
            stack.supervise()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = stack.stop()
    _say(out, f"stopped (exit codes: {', '.join(f'{k} {v}' for k, v in codes.items())})")
    return 0


def _spec(cfg: NodeConfig, ports: StackPorts, user: str | None, password: str | None,
          config_file: Path | None) -> StackSpec:
    ports.validate()
    restrict_umask()  # Orthanc and the node inherit it: their storage, indexes and logs are created private
    make_private_dirs(cfg.data_dir / "logs")
    creds = resolve_credentials(cfg.data_dir / "orthanc", user, password)
    # the node runs in the install's folder: a relative path would point elsewhere there
    return StackSpec(cfg=cfg, ports=ports, creds=creds, config_file=config_file.resolve() if config_file else None)


def run_stack(cfg: NodeConfig, http_port: int = 8042, dicom_port: int = 4242, node_port: int = 11112, *,
              orthanc_user: str | None = None, orthanc_password: str | None = None,
              config_file: Path | None = None, out: TextIO = sys.stdout) -> int:
    """Run Orthanc + the node wired together in the foreground until Ctrl-C/SIGTERM.

    Parameters
    ----------
    cfg
        The node's configuration (AE title, data dir, models, stable seconds -> Orthanc StableAge).
    http_port, dicom_port, node_port
        Orthanc HTTP, Orthanc DICOM and node DICOM ports.
    orthanc_user, orthanc_password
        Orthanc HTTP login; both ``None`` -> generated on first run and stored in the data dir.
    config_file
        The TOML file ``cfg`` came from, passed on to ``sci-node serve``.
    out
        Where the "where to look" lines go.

    Returns
    -------
    int
        0 after a clean stop.
    """
    spec = _spec(cfg, StackPorts(http_port, dicom_port, node_port), orthanc_user, orthanc_password, config_file)
    with _running(spec, out) as stack:
        return _run_until_signal(stack, out)


@contextlib.contextmanager
def _running(spec: StackSpec, out: TextIO) -> Iterator[Stack]:
    """Start Orthanc + the node, wait until both answer, say where to look; stop both on exit."""
    stack = Stack(spec)
    try:
        stack.start()
        stack.wait_ready()
        _announce(stack, out)
        yield stack
    finally:
        stack.stop()


def sample_series_files(sample_dir: Path = SAMPLE_DIR) -> list[Path]:
    """The committed sample series: every DICOM file (``DICM`` preamble) under ``sample_dir``."""
    files = []
    for path in sorted(sample_dir.rglob("*")) if sample_dir.is_dir() else ():
        if path.is_file():
            with open(path, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    files.append(path)
    if not files:
        raise StackError(f"no sample DICOM series under {str(sample_dir)!r}")
    return files


def storescu(files: Sequence[Path], port: int, calling_ae: str = "SCANNER", called_ae: str = ORTHANC_AET,
             host: str = "127.0.0.1", tls: tuple[Path, Path, Path] | None = None) -> None:
    """Send files with dcmtk's ``storescu`` (what a scanner would do); ``tls``: key, certificate, trusted."""
    exe = shutil.which("storescu")
    if exe is None:
        raise StackError("dcmtk's storescu is not installed: run bash scripts/install.sh")
    tls_args = ["+tls", str(tls[0]), str(tls[1]), "+cf", str(tls[2])] if tls else []
    proc = subprocess.run([exe, *tls_args, "-aet", calling_ae, "-aec", called_ae, host, str(port), *map(str, files)],
                          capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"))
    if proc.returncode != 0:
        raise StackError(f"storescu to {called_ae}@{host}:{port} failed ({proc.returncode}): "
                         f"{proc.stderr.strip()[-500:]}")


def wait_for_modality(client: Any, study_uid: str, modality: str, timeout: float,
                      alive: Any = None) -> list[str]:
    """Poll ``POST /tools/find`` until a series of ``modality`` exists in the study; its Orthanc ids."""
    import httpx

    deadline = time.monotonic() + timeout
    query = {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}
    while True:
        try:
            found = client.post_tools_find(json=query)
        except httpx.TransportError:  # e.g. Orthanc closed an idle keep-alive connection: ask again
            found = []
        if found:
            return list(found)
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise StackError(f"no {modality} series in study {study_uid} after {timeout:.0f} s")
        time.sleep(1.0)


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def with_demo_sender(cfg: NodeConfig) -> NodeConfig:
    """``cfg`` whose ``[stack] scanners`` also allow the demo's sender, ``DEMO_AET`` from the local address."""
    demo = Scanner(DEMO_AET, _send_host(cfg))
    if demo in cfg.stack.scanners:
        return cfg
    return dataclasses.replace(cfg, stack=dataclasses.replace(cfg.stack, scanners=(*cfg.stack.scanners, demo)))


def run_demo(cfg: NodeConfig, http_port: int = 8042, dicom_port: int = 4242, node_port: int = 11112,
             keep_running: bool = True, *, orthanc_user: str | None = None, orthanc_password: str | None = None,
             config_file: Path | None = None, sample_dir: Path = SAMPLE_DIR, seg_timeout: float = 900.0,
             out: TextIO = sys.stdout) -> int:
    """Start the stack, send the sample series into Orthanc, wait for its SEG, print the OHIF URL.

    Parameters are those of :func:`run_stack`, plus ``keep_running`` (stay up until Ctrl-C after
    the SEG arrived), ``sample_dir`` (the series to send) and ``seg_timeout`` (seconds).

    Raises
    ------
    StackError
        A child died, the sample is missing, storescu failed or no SEG arrived in time.
    """
    files = sample_series_files(sample_dir)
    study_uid = _study_uid(files[0])
    cfg = with_demo_sender(cfg)
    spec = _spec(cfg, StackPorts(http_port, dicom_port, node_port), orthanc_user, orthanc_password, config_file)
    with _running(spec, out) as stack:
        t0 = time.monotonic()
        tls = cfg.stack.tls
        storescu(files, dicom_port, calling_ae=DEMO_AET, host=_send_host(cfg),
                 tls=(Path(str(tls.key_file)), Path(str(tls.cert_file)), trust_bundle_path(cfg.data_dir / "orthanc"))
                 if tls.enabled else None)
        _say(out, f"sent {len(files)} sample instances as {DEMO_AET} (study {study_uid}); waiting for the "
                  "segmentation...")
        client = stack.client()
        segs = wait_for_modality(client, study_uid, "SEG", seg_timeout, alive=stack.supervise)
        seg_uid = client.get_series_id(segs[-1])["MainDicomTags"]["SeriesInstanceUID"]
        _say(out, f"DICOM-SEG in Orthanc {time.monotonic() - t0:.1f} s after the send")
        _say_viewer_links(out, stack, client, study_uid, seg_uid)
        if keep_running:
            return _run_until_signal(stack, out)
        return 0
