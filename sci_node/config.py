"""The node's one typed, frozen configuration.

Precedence: command-line flags override the TOML file, which overrides the defaults
below. :func:`load_config` is called once in ``main`` and the resulting
:class:`NodeConfig` is passed explicitly to everything that needs it.

Every invalid or unknown key is reported at once in a single :class:`ConfigError`.
"""


from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from sci_node.errors import ConfigError

_AET_RE = re.compile(r"^[\x20-\x7e]{1,16}$")
REPO_ROOT = Path(__file__).resolve().parent.parent


class LogFormat(StrEnum):
    """How log lines are rendered."""

    AUTO = "auto"  # console on a TTY, JSON lines otherwise
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True)
class AllowedAE:
    """A calling AE title allowed to associate, optionally pinned to a source host."""

    ae_title: str
    host: str | None = None

    def matches(self, ae_title: str, host: str) -> bool:
        """Return True when ``ae_title`` (and ``host`` if pinned) match this entry."""
        return ae_title.strip() == self.ae_title and (self.host is None or self.host == host)


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS for the SCP (server side) and the export SCU (client side)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class Limits:
    """Resource limits of the SCP."""

    #: associations at once; one more is rejected transiently ("local limit exceeded"). Each costs
    #: ~0.1 MiB open and at its peak ~2x the instance it is receiving (64 receiving 512 x 512 MR
    #: instances at once: 147 MiB resident; bench/association_memory.py, docs/node.md "Bursts")
    max_associations: int = 64
    max_pdu_bytes: int = 262_144
    max_instances_per_association: int = 100_000
    max_instances_per_series: int = 5_000
    min_free_disk_mb: int = 500
    #: seconds a new TCP connection has to send its A-ASSOCIATE-RQ (TLS handshake included);
    #: until then it holds no association slot, after it it is closed (health checks, scanners)
    association_request_timeout_seconds: float = 5.0
    #: connections allowed to wait for their A-ASSOCIATE-RQ at once; one more is closed at once
    max_pending_connections: int = 64
    #: how long an idle association's DUL reactor sleeps when the link has nothing for it (pynetdicom's
    #: default 1 ms; docs/node.md "Ingest speed")
    reactor_poll_seconds: float = 0.001
    #: the same sleep while the association is storing (from its establishment and each C-STORE until
    #: 0.5 s without one; sci_node.dicom.poll); 0 = always ``reactor_poll_seconds``
    reactor_poll_busy_seconds: float = 0.0001
    #: size of the spool journal's ring (MiB): each instance is made durable by one append + fdatasync
    #: there instead of a file fsync and a directory fsync (sci_node.store.journal); 0 = no journal
    spool_journal_mb: int = 64
    #: with the journal on: Success once the instance is appended there; its file and index row are written
    #: right after by a writer thread (sci_node.store.writebehind; docs/node.md "Crash safety"). Off by default:
    #: no measurable gain on the 2-core reference machine (docs/benchmarks.md section 1, "write-behind")
    spool_write_behind: bool = False


@dataclass(frozen=True)
class ExportPolicy:
    """Retry behaviour of the export outbox (exponential backoff)."""

    initial_backoff_seconds: float = 2.0
    max_backoff_seconds: float = 300.0
    max_attempts: int = 20


@dataclass(frozen=True)
class RoutingRules:
    """Which routed series are segmented.

    A series is segmented when the anatomy is spine, its view is in ``views`` and its
    sequence in ``cord_sequences``; lesions are segmented on ``lesion_sequences``.
    A classifier output below ``min_confidence`` abstains (routes the series out).
    Before the classifiers: a series with fewer than ``min_slices`` slices (along its thinnest
    axis; default 2, so a single slice) is routed out as a localiser / single slice (the ivadomed
    test data hold real 2-slice axial T2*w stacks the cord model segments), and with ``header_anatomy_veto`` a
    header that names a non-spine body part and never the spine routes it out
    (:mod:`sci_node.routing.anatomy_rules`; the header can only route out, never in).
    With ``sequence_by_action`` (default) a sequence head whose top class is below
    ``min_confidence`` does not abstain when the ``cord_sequences`` classes together reach it:
    the cord is segmented, lesions are not (:func:`sci_node.routing.decide_by_action`).
    With ``sequence_contrast_check`` (default) a sequence the image network decided (no header
    rule fired) is checked against the CSF/cord contrast around the segmented cord
    (:mod:`sci_node.routing.contrast_rules`): CSF darker than the cord makes it T1w (no lesions), CSF
    several times brighter makes it T2w; the check never adds lesions
    (:func:`sci_node.routing.recheck_sequence`).
    """

    views: tuple[str, ...] = ("sagittal", "axial")
    cord_sequences: tuple[str, ...] = ("T1w", "T2w", "T2starw")
    lesion_sequences: tuple[str, ...] = ("T2w", "T2starw")
    min_confidence: float = 0.5
    header_anatomy_veto: bool = True
    min_slices: int = 2
    sequence_by_action: bool = True
    sequence_contrast_check: bool = True


@dataclass(frozen=True)
class EngineConfig:
    """Where complete series are processed (``[engine]``; docs/scale-out.md).

    ``kind = "local"`` (the default) runs the models in the node's own worker threads, exactly
    as without this section. ``kind = "celery"`` makes the node a gateway: each complete series
    is dispatched as a Celery task through ``broker_url`` to ``sci-node worker`` processes on
    any machine; the series' instances and the results travel through ``store_url`` (Redis,
    default: the broker itself when it is Redis), under their own keys with an expiry.
    """

    kind: str = "local"
    broker_url: str | None = None
    #: Redis for the payloads, heartbeats and results (default: ``broker_url`` if it is Redis)
    store_url: str | None = None
    #: the queue jobs are dispatched to (GPU workers consume ``gpu``, CPU workers ``cpu``)
    queue: str = "cpu"
    #: a dispatched job whose result has not come back this long after dispatch is dispatched again
    lease_seconds: float = 900.0
    #: a worker running a task refreshes its heartbeat this often; 3 missed beats = worker lost
    heartbeat_seconds: float = 2.0
    #: expiry of the payload and result keys in the store
    payload_ttl_seconds: float = 86_400.0
    #: key prefix in the store (several gateways may share one Redis)
    namespace: str = "sci-node"
    #: ``sci-node worker``: tasks run at once in one worker process
    concurrency: int = 1
    #: jobs out at the broker or the workers at once (bounds the payloads held in Redis)
    max_outstanding: int = 32
    #: accept a broker or store on another host whose URL carries no password (Redis ``requirepass`` or
    #: an ACL user): refused by default, because the payloads are whole DICOM series (PHI) and whoever
    #: can write to Redis can put objects into PACS through the gateway. Warned about either way.
    allow_unauthenticated_broker: bool = False

    @property
    def redis_url(self) -> str | None:
        """The Redis URL of the payload store (``store_url``, else a Redis ``broker_url``)."""
        if self.store_url:
            return self.store_url
        if self.broker_url and self.broker_url.split(":", 1)[0] in ("redis", "rediss"):
            return self.broker_url
        return None


@dataclass(frozen=True)
class CorrectionsPolicy:
    """Radiologists' corrections of our SEGs (``[corrections]``; docs/corrections.md)."""

    #: delete a correction's images and masks this long after it was received (None: keep them);
    #: its change measures stay for the statistics
    retention_days: float | None = None
    #: ``sci-node status`` and ``/sci-node/``: mean original-vs-corrected cord Dice over the last N
    status_window: int = 20
    #: a cord model whose mean Dice over the window is below this is flagged "heavily corrected"
    heavy_dice_below: float = 0.8
    #: ``sci-node train ... --corrections``: share of the correction patients held out for scoring
    heldout_fraction: float = 0.2
    #: Orthanc users whose DICOMweb STOW-RS uploads may be corrections (empty: every named Orthanc user)
    users: tuple[str, ...] = ()
    #: DICOM senders (``AET@IPV4``, calling AE title and source address) whose SEGs may be corrections
    dicom_senders: tuple["Scanner", ...] = ()
    #: flag a correction for review when its cord Dice against the node's own cord is below this
    min_cord_dice: float = 0.5
    #: ... or when more than ``max_outside_fraction`` of its cord + lesion voxels lie farther than
    #: ``neighbourhood_mm`` from the node's cord (a mask drawn somewhere else)
    neighbourhood_mm: float = 10.0
    max_outside_fraction: float = 0.02


@dataclass(frozen=True)
class FollowupPolicy:
    """Follow-up comparison against the same person's prior series (``[followup]``; docs/followup.md)."""

    #: after a series is segmented, look for a prior of the same patient in the node's own job history
    enabled: bool = True
    #: the longest interval between the two studies' dates that is compared, in days
    max_interval_days: float = 3650.0
    #: how many of the latest done jobs are searched for the prior
    search_jobs: int = 500
    #: the PACS asked (C-FIND, then C-GET) when the job history holds no prior, ``AET@HOST:PORT``
    #: (in the stack: its own Orthanc); None: the job history only
    pacs: Destination | None = None
    #: how many of the PACS' candidate series (newest study first) are fetched and routed at most
    pacs_max_series: int = 4
    #: an unreachable PACS is asked again after this many seconds, doubling up to ``retry_max_seconds``
    retry_seconds: float = 30.0
    retry_max_seconds: float = 1800.0
    #: and given up (the job's follow-up says so) this many hours after the series was processed
    give_up_hours: float = 72.0


@dataclass(frozen=True)
class Scanner:
    """A modality the stack's Orthanc accepts on its DICOM port: calling AE title and source IPv4 address."""

    ae_title: str
    host: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}"


@dataclass(frozen=True)
class StackConfig:
    """The embedded stack (``[stack]``; ``sci-node stack`` / ``demo``, docs/orthanc.md).

    Orthanc's DICOM port accepts only the node and ``scanners`` (by calling AE title *and* source
    address, with the called AE checked), listens on ``dicom_bind`` only, and speaks DICOM TLS
    when ``tls.enabled``. The stack restarts a child that dies, ``restart_initial_backoff_seconds``
    doubling up to ``restart_max_backoff_seconds``; after ``max_restarts`` restarts of a child
    that never stayed up ``restart_reset_seconds`` it gives up. The plugin forwards a series again
    when its forward to the node failed: ``forward_retries`` times, ``forward_retry_seconds``
    doubling up to ``forward_retry_max_seconds`` apart.
    """

    scanners: tuple[Scanner, ...] = ()
    dicom_bind: str = "127.0.0.1"
    tls: TLSConfig = field(default_factory=TLSConfig)
    restart_initial_backoff_seconds: float = 1.0
    restart_max_backoff_seconds: float = 60.0
    restart_reset_seconds: float = 60.0
    max_restarts: int = 10
    forward_retries: int = 5
    forward_retry_seconds: float = 5.0
    forward_retry_max_seconds: float = 300.0


@dataclass(frozen=True)
class NodeConfig:
    """Everything the running node and the CLI need, validated and immutable."""

    ae_title: str = "SCINODE"
    port: int = 11112
    bind: str = "127.0.0.1"
    allowed_aes: tuple[AllowedAE, ...] = ()
    destinations: tuple[Destination, ...] = ()
    data_dir: Path = Path("var/sci-node")
    models_dir: Path = REPO_ROOT / "models"
    stable_seconds: float = 10.0
    #: a series whose last association ended in A-ABORT (ours or the peer's) waits this long
    #: after the abort for a resend before it completes (then marked "incomplete transfer")
    abort_grace_seconds: float = 60.0
    #: largest fraction of a series' regular slice grid that may be missing; slices missing
    #: within it are interpolated for inference and get no SEG frame, more is refused
    max_missing_fraction: float = 0.25
    workers: int = 1
    device: str = "cpu"
    #: torch intra-op threads for inference; 0 = auto: the CPUs this process may use minus one
    #: (the SCP, Orthanc, the OS), divided among the workers, at least 1. Oversubscribed torch
    #: threads are very slow: 2 threads on 2 cores with one core busy took 8 s instead of 0.5 s
    #: for one series (docs/benchmarks.md).
    torch_threads: int = 0
    #: what the worker runs on a complete series: "pipeline" (the models) or "derived-sc"
    #: (a built-in plumbing check that returns one derived Secondary Capture per series)
    processor: str = "pipeline"
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = "INFO"
    retention_days: float | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: Limits = field(default_factory=Limits)
    export: ExportPolicy = field(default_factory=ExportPolicy)
    routing: RoutingRules = field(default_factory=RoutingRules)
    engine: EngineConfig = field(default_factory=EngineConfig)
    corrections: CorrectionsPolicy = field(default_factory=CorrectionsPolicy)
    followup: FollowupPolicy = field(default_factory=FollowupPolicy)
    stack: StackConfig = field(default_factory=StackConfig)

    @property
    def accepts_any_ae(self) -> bool:
        """True when no allow-list is configured (every calling AE is accepted)."""
        return not self.allowed_aes


def parse_destination(text: str) -> Destination:
    """Parse ``AET@HOST:PORT`` (or ``AET@HOST PORT``) into a :class:`Destination`.

    Raises
    ------
    ConfigError
        When the text is not of that form or the port is not 1..65535.
    """
    m = re.fullmatch(r"\s*([^@]{1,16})@([^:\s]+)[:\s](\d+)\s*", text)
    if not m:
        raise ConfigError(f"destination {text!r} is not of the form AET@HOST:PORT")
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise ConfigError(f"destination {text!r}: port {port} is not in 1..65535")
    return Destination(m.group(1).strip(), m.group(2), port)


def parse_scanner(text: str, key: str = "stack.scanners") -> Scanner:
    """Parse ``AET@IPV4`` into a :class:`Scanner` (Orthanc checks the source by IP address only).

    Raises
    ------
    ConfigError
        When the AE title is not 1-16 printable characters or the host is not an IPv4 address.
    """
    aet, at, host = text.partition("@") if isinstance(text, str) else ("", "", "")
    if not at or not _AET_RE.match(aet.strip()) or "\\" in aet:
        raise ConfigError(f"{key}: {text!r} must be AET@IPV4 (AE title of 1-16 printable characters)")
    try:
        ip = ipaddress.IPv4Address(host.strip())
    except ValueError:
        raise ConfigError(f"{key}: {text!r}: host {host!r} must be an IPv4 address (Orthanc checks the "
                          "sender by address, not by name)") from None
    return Scanner(aet.strip(), str(ip))


def parse_allowed_ae(text: str) -> AllowedAE:
    """Parse ``AET`` or ``AET@HOST`` into an :class:`AllowedAE`."""
    aet, _, host = text.partition("@")
    if not _AET_RE.match(aet.strip()):
        raise ConfigError(f"allowed AE {text!r}: AE title must be 1-16 printable characters")
    return AllowedAE(aet.strip(), host or None)


# -- loading -----------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "tls": TLSConfig,
    "limits": Limits,
    "export": ExportPolicy,
    "routing": RoutingRules,
    "engine": EngineConfig,
    "corrections": CorrectionsPolicy,
    "followup": FollowupPolicy,
    "stack": StackConfig,
}


def _coerce(name: str, value: Any, target: Any, errors: list[str]) -> Any:
    """Coerce a TOML/CLI value to the dataclass field type named by ``target``."""
    t = str(target)
    try:
        if t in ("Path", "Path | None"):
            return None if value is None else Path(value).expanduser()
        if t in ("int",):
            if isinstance(value, bool) or int(value) != float(value):
                raise ValueError
            return int(value)
        if t == "str | None":
            if value is not None and not isinstance(value, str):
                raise ValueError
            return value
        if t in ("float", "float | None"):
            return None if value is None else float(value)
        if t == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if t.startswith("tuple[str"):
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
        if t == "LogFormat":
            return LogFormat(value)
    except (TypeError, ValueError):
        errors.append(f"{name}: invalid value {value!r} (expected {t})")
        return None
    return value


def _build_section(cls: type, raw: Mapping[str, Any], prefix: str, errors: list[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown key")
        elif str(fields[key].type) == "TLSConfig":  # [stack.tls]
            if isinstance(value, Mapping):
                kwargs[key] = _build_section(TLSConfig, value, f"{prefix}{key}.", errors)
            else:
                errors.append(f"[{prefix}{key}]: must be a table")
        elif (key, cls) == ("pacs", FollowupPolicy):
            kwargs[key] = (_collect(parse_destination, [value], prefix + key, errors) or [None])[0] if value else None
        elif (key, cls) in (("scanners", StackConfig), ("dicom_senders", CorrectionsPolicy)):
            kwargs[key] = tuple(_collect(lambda t, k=prefix + key: parse_scanner(t, k), value, prefix + key, errors))
        else:
            kwargs[key] = _coerce(prefix + key, value, fields[key].type, errors)
    return cls(**kwargs)


def _validate(cfg: NodeConfig, errors: list[str]) -> None:
    if not _AET_RE.match(cfg.ae_title) or cfg.ae_title != cfg.ae_title.strip():
        errors.append(f"ae_title: {cfg.ae_title!r} must be 1-16 printable characters")
    if not 0 < cfg.port < 65536:
        errors.append(f"port: {cfg.port} is not in 1..65535")
    if cfg.stable_seconds <= 0:
        errors.append(f"stable_seconds: {cfg.stable_seconds} must be > 0")
    if cfg.abort_grace_seconds < 0:
        errors.append(f"abort_grace_seconds: {cfg.abort_grace_seconds} must be >= 0")
    if not 0 <= cfg.max_missing_fraction < 1:
        errors.append(f"max_missing_fraction: {cfg.max_missing_fraction} must be in [0, 1)")
    if cfg.workers < 1:
        errors.append(f"workers: {cfg.workers} must be >= 1")
    if cfg.torch_threads < 0:
        errors.append(f"torch_threads: {cfg.torch_threads} must be >= 0 (0 = auto)")
    if cfg.device not in ("cpu", "cuda", "auto"):
        errors.append(f"device: {cfg.device!r} must be cpu, cuda or auto")
    if cfg.processor not in ("pipeline", "derived-sc"):
        errors.append(f"processor: {cfg.processor!r} must be pipeline or derived-sc")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        errors.append(f"log_level: {cfg.log_level!r} must be DEBUG, INFO, WARNING or ERROR")
    if cfg.tls.enabled and (cfg.tls.cert_file is None or cfg.tls.key_file is None):
        errors.append("tls: enabled needs cert_file and key_file")
    if cfg.tls.require_client_cert and cfg.tls.ca_file is None:
        errors.append("tls: require_client_cert needs ca_file")
    _validate_stack(cfg, errors)
    if cfg.retention_days is not None and not cfg.retention_days > 0:
        errors.append(f"retention_days: {cfg.retention_days} must be > 0 (or unset: keep everything)")
    if cfg.limits.max_associations < 1:
        errors.append(f"limits.max_associations: {cfg.limits.max_associations} must be >= 1")
    if not 0 < cfg.limits.association_request_timeout_seconds <= 60:
        errors.append(f"limits.association_request_timeout_seconds: {cfg.limits.association_request_timeout_seconds}"
                      " must be in (0, 60]")
    if not 0 < cfg.limits.reactor_poll_seconds <= 0.1:
        errors.append(f"limits.reactor_poll_seconds: {cfg.limits.reactor_poll_seconds} must be in (0, 0.1]")
    if not 0 <= cfg.limits.reactor_poll_busy_seconds <= cfg.limits.reactor_poll_seconds:
        errors.append(f"limits.reactor_poll_busy_seconds: {cfg.limits.reactor_poll_busy_seconds} must be in "
                      f"[0, reactor_poll_seconds = {cfg.limits.reactor_poll_seconds}] (0 = not adaptive)")
    if not (cfg.limits.spool_journal_mb == 0 or 8 <= cfg.limits.spool_journal_mb <= 4096):
        errors.append(f"limits.spool_journal_mb: {cfg.limits.spool_journal_mb} must be 0 (off) or in [8, 4096]")
    if cfg.limits.max_pending_connections < 1:
        errors.append(f"limits.max_pending_connections: {cfg.limits.max_pending_connections} must be >= 1")
    if not 0 <= cfg.routing.min_confidence <= 1:
        errors.append(f"routing.min_confidence: {cfg.routing.min_confidence} must be in [0, 1]")
    if cfg.routing.min_slices < 1:
        errors.append(f"routing.min_slices: {cfg.routing.min_slices} must be >= 1 (1 = no localiser guard)")
    _validate_engine(cfg.engine, errors)
    cor = cfg.corrections
    if cor.retention_days is not None and not cor.retention_days > 0:
        errors.append(f"corrections.retention_days: {cor.retention_days} must be > 0 (or unset: keep them)")
    fu = cfg.followup
    if fu.pacs_max_series < 1 or not 0 < fu.retry_seconds <= fu.retry_max_seconds or fu.give_up_hours <= 0:
        errors.append(f"followup: pacs_max_series {fu.pacs_max_series} must be >= 1, 0 < retry_seconds "
                      f"{fu.retry_seconds} <= retry_max_seconds {fu.retry_max_seconds}, give_up_hours "
                      f"{fu.give_up_hours} > 0")
    if not cfg.followup.max_interval_days > 0 or cfg.followup.search_jobs < 1:
        errors.append(f"followup: max_interval_days {cfg.followup.max_interval_days} must be > 0 and search_jobs "
                      f"{cfg.followup.search_jobs} >= 1")
    if cor.status_window < 1:
        errors.append(f"corrections.status_window: {cor.status_window} must be >= 1")
    if not 0 <= cor.min_cord_dice <= 1 or not 0 <= cor.max_outside_fraction <= 1 or not cor.neighbourhood_mm > 0:
        errors.append(f"corrections: min_cord_dice {cor.min_cord_dice} and max_outside_fraction "
                      f"{cor.max_outside_fraction} must be in [0, 1], neighbourhood_mm {cor.neighbourhood_mm} > 0")
    if not 0 <= cor.heavy_dice_below <= 1 or not 0 <= cor.heldout_fraction < 1:
        errors.append(f"corrections: heavy_dice_below {cor.heavy_dice_below} must be in [0, 1] and "
                      f"heldout_fraction {cor.heldout_fraction} in [0, 1)")


def _validate_stack(cfg: NodeConfig, errors: list[str]) -> None:
    st = cfg.stack
    try:
        ipaddress.IPv4Address(st.dicom_bind)
    except ValueError:
        errors.append(f"stack.dicom_bind: {st.dicom_bind!r} must be an IPv4 address (127.0.0.1, 0.0.0.0 for every "
                      "interface, or one of this host's addresses)")
    if st.tls.enabled and (st.tls.cert_file is None or st.tls.key_file is None):
        errors.append("stack.tls: enabled needs cert_file and key_file")
    if st.tls.require_client_cert and not st.tls.enabled:
        errors.append("stack.tls: require_client_cert needs enabled = true")
    for s in st.scanners:
        if s.ae_title == cfg.ae_title:
            errors.append(f"stack.scanners: {s} has the node's own AE title {cfg.ae_title!r}")
    if len({(s.ae_title, s.host) for s in st.scanners}) != len(st.scanners):
        errors.append(f"stack.scanners: duplicate entries in {[str(s) for s in st.scanners]}")
    if not 0 < st.restart_initial_backoff_seconds <= st.restart_max_backoff_seconds:
        errors.append(f"stack.restart_initial_backoff_seconds: {st.restart_initial_backoff_seconds} must be > 0 and "
                      f"<= restart_max_backoff_seconds ({st.restart_max_backoff_seconds})")
    if st.max_restarts < 1 or st.restart_reset_seconds <= 0:
        errors.append(f"stack.max_restarts: {st.max_restarts} must be >= 1 and restart_reset_seconds "
                      f"{st.restart_reset_seconds} > 0")
    if st.forward_retries < 0 or not 0 < st.forward_retry_seconds <= st.forward_retry_max_seconds:
        errors.append(f"stack.forward_retries: {st.forward_retries} must be >= 0, forward_retry_seconds "
                      f"{st.forward_retry_seconds} > 0 and <= forward_retry_max_seconds {st.forward_retry_max_seconds}")


_BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")
#: broker/store URL schemes that encrypt the connection (TLS)
TLS_SCHEMES = ("rediss", "amqps")


def redact_url(url: str) -> str:
    """A broker/store URL with its password replaced by ``***`` (for errors, logs and status)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if "@" not in parts.netloc:
        return url
    cred, _, host = parts.netloc.rpartition("@")
    user, colon, _ = cred.partition(":")
    netloc = f"{user}{':***' if colon else ''}@{host}" if user or colon else f"***@{host}"
    return parts._replace(netloc=netloc).geturl()


def url_has_password(url: str) -> bool:
    """True when ``url`` carries a password (``redis://:PW@host``, ``rediss://USER:PW@host``, ``amqp://U:PW@h``)."""
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def broker_auth_problems(eng: EngineConfig) -> list[str]:
    """Why the broker/store URLs must be refused: another host and no password, unless allowed."""
    if eng.allow_unauthenticated_broker:
        return []
    out = []
    for key, url in (("broker_url", eng.broker_url), ("store_url", eng.store_url)):
        if url and "://" in url and not url_has_password(url) and not is_loopback_url(url):
            out.append(f"engine.{key}: {redact_url(url)!r} is on another host and has no password: whoever reaches "
                       "it reads the series sent to the workers (patient data) and can queue objects for PACS. Put "
                       "the Redis password or ACL user in the URL (redis://USER:PASSWORD@HOST:6379/0, rediss:// for "
                       "TLS) or set [engine] allow_unauthenticated_broker = true")
    return out


def _validate_engine(eng: EngineConfig, errors: list[str]) -> None:
    if eng.kind not in ("local", "celery"):
        errors.append(f"engine.kind: {eng.kind!r} must be local or celery")
    for key, url, schemes in (("broker_url", eng.broker_url, _BROKER_SCHEMES),
                              ("store_url", eng.store_url, ("redis", "rediss"))):
        if url is not None and (url.split("://", 1)[0] not in schemes or "://" not in url):
            errors.append(f"engine.{key}: {redact_url(url)!r} is not a {' / '.join(s + '://' for s in schemes)} URL")
    errors.extend(broker_auth_problems(eng))
    if eng.kind == "celery" and not eng.broker_url:
        errors.append("engine.broker_url: engine kind celery needs a broker URL (e.g. redis://127.0.0.1:6379/0)")
    elif eng.kind == "celery" and eng.redis_url is None:
        errors.append(f"engine.store_url: the broker {redact_url(str(eng.broker_url))!r} is not Redis: set store_url"
                      " to a redis:// URL for the payloads and results")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", eng.queue):
        errors.append(f"engine.queue: {eng.queue!r} must be 1-64 letters, digits, '_', '.' or '-'")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", eng.namespace):
        errors.append(f"engine.namespace: {eng.namespace!r} must be 1-64 letters, digits, '_', '.' or '-'")
    if eng.heartbeat_seconds <= 0 or eng.lease_seconds < 6 * eng.heartbeat_seconds:
        errors.append(f"engine.lease_seconds: {eng.lease_seconds} must be at least 6 heartbeats"
                      f" ({6 * eng.heartbeat_seconds} s) and heartbeat_seconds > 0")
    if eng.payload_ttl_seconds < eng.lease_seconds:
        errors.append(f"engine.payload_ttl_seconds: {eng.payload_ttl_seconds} must be >= lease_seconds")
    if eng.concurrency < 1:
        errors.append(f"engine.concurrency: {eng.concurrency} must be >= 1")
    if eng.max_outstanding < 1:
        errors.append(f"engine.max_outstanding: {eng.max_outstanding} must be >= 1")


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """Build the :class:`NodeConfig` from defaults, an optional TOML file and overrides.

    Parameters
    ----------
    path
        A TOML file (see ``sci-node.example.toml``); ``None`` for defaults only.
    overrides
        Top-level keys from the command line; ``None`` values are ignored. ``destinations``
        and ``allowed_aes`` take strings (``AET@HOST:PORT`` / ``AET[@HOST]``). A section
        (``engine``) given as a mapping overrides only the keys it names.

    Raises
    ------
    ConfigError
        Listing every problem found, one per line.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in _SECTIONS and isinstance(value, Mapping) and isinstance(raw.get(key), Mapping):
            value = {**raw[key], **{k: v for k, v in value.items() if v is not None}}  # a flag overrides one key
        elif key in _SECTIONS and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if v is not None}
        raw[key] = value
    errors: list[str] = []
    kwargs: dict[str, Any] = {}
    top = {f.name: f for f in dataclasses.fields(NodeConfig)}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                errors.append(f"[{key}]: must be a table")
                continue
            kwargs[key] = _build_section(_SECTIONS[key], value, key + ".", errors)
        elif key == "destinations":
            kwargs[key] = tuple(_collect(parse_destination, value, key, errors))
        elif key == "allowed_aes":
            kwargs[key] = tuple(_collect(parse_allowed_ae, value, key, errors))
        elif key in top:
            kwargs[key] = _coerce(key, value, top[key].type, errors)
        else:
            errors.append(f"{key}: unknown key")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    cfg = NodeConfig(**kwargs)
    _validate(cfg, errors)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return dataclasses.replace(cfg, data_dir=cfg.data_dir.expanduser().resolve(),
                               models_dir=cfg.models_dir.expanduser().resolve())


def _collect(parse: Any, value: Any, key: str, errors: list[str]) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        errors.append(f"{key}: must be a list of strings")
        return []
    out = []
    for item in value:
        try:
            out.append(parse(item))
        except ConfigError as exc:
            errors.append(str(exc))
    return out
