"""The engine's Redis adapter: key names, chunked blobs with an expiry, series/result packing.

Large payloads never travel inside task arguments: a series' instances (and a job's result
files) are one zip archive stored under ``{ns}:payload:{token}`` (``{ns}:result:{token}``) as
chunks of at most :data:`CHUNK_BYTES` with a manifest, all with the same expiry, and deleted by
the node once it holds the result.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

from sci_node.config import TLS_SCHEMES, EngineConfig, is_loopback_url, redact_url, url_has_password
from sci_node.errors import EngineError
from sci_node.store.private_files import make_private_dirs

if TYPE_CHECKING:
    import redis

CHUNK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace (one gateway's keys; several gateways may share a Redis)."""

    ns: str

    def payload(self, token: str) -> str:
        return f"{self.ns}:payload:{token}"

    def result(self, token: str) -> str:
        return f"{self.ns}:result:{token}"

    def heartbeat(self, token: str) -> str:
        return f"{self.ns}:hb:{token}"

    def cancelled(self, token: str) -> str:
        return f"{self.ns}:cancel:{token}"

    @property
    def events(self) -> str:
        return f"{self.ns}:events"

    @property
    def events_taken(self) -> str:
        """Events the node has taken but not yet committed (re-read after a node crash)."""
        return f"{self.ns}:events:taken"

    def worker(self, name: str) -> str:
        return f"{self.ns}:worker:{name}"


def redact(url: str) -> str:
    """A broker/store URL without its password (for logs and status)."""
    return redact_url(url)


def security_warnings(eng: EngineConfig) -> list[tuple[str, dict[str, str]]]:
    """What to warn about the broker and the store at start: (event, fields) per URL.

    ``engine.broker_unauthenticated``: no password in the URL (even on loopback: any local process
    could read the payloads); ``engine.broker_plaintext``: another host over plain TCP (the series
    travel unencrypted). :func:`sci_node.config.broker_auth_problems` refuses the worst case at load.
    """
    out: list[tuple[str, dict[str, str]]] = []
    for what, url in (("broker", eng.broker_url), ("store", eng.redis_url)):
        if not url or (what == "store" and url == eng.broker_url):
            continue
        if not url_has_password(url):
            out.append(("engine.broker_unauthenticated", {
                "url": redact_url(url), "role": what,
                "detail": "no password in the URL: whoever reaches it reads the series payloads (patient data) and "
                          "can queue results for PACS; set Redis requirepass or an ACL user and put it in the URL"}))
        if not is_loopback_url(url) and url.split("://", 1)[0] not in TLS_SCHEMES:
            out.append(("engine.broker_plaintext", {
                "url": redact_url(url), "role": what,
                "detail": "another host over plain TCP: the series travel unencrypted; use rediss:// (TLS)"}))
    return out


def ssl_options(url: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a ``rediss://`` URL, from its query (redis-py's own parameters):
    ``ssl_cert_reqs`` (``required``, the default, ``optional`` or ``none``), ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``; None for any other scheme.

    Raises
    ------
    EngineError
        An ``ssl_cert_reqs`` value that is not one of the three.
    """
    import ssl

    if not url.startswith("rediss://"):
        return None
    query = dict(parse_qsl(urlsplit(url).query))
    reqs = query.get("ssl_cert_reqs", "required").lower()
    modes = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    if reqs not in modes:
        raise EngineError(f"{redact_url(url)!r}: ssl_cert_reqs={reqs!r} must be required, optional or none")
    opts: dict[str, Any] = {"ssl_cert_reqs": modes[reqs]}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(key):
            opts[key] = query[key]
    return opts


def connect(url: str, timeout_s: float = 3.0) -> "redis.Redis":
    """A redis-py client for ``url``, checked with PING.

    Raises
    ------
    EngineError
        redis-py is not installed, or the server does not answer (the message names the URL).
    """
    try:
        import redis
    except ImportError as exc:
        raise EngineError("the celery engine needs the scale-out extra: pip install 'sci-node[scale-out]'"
                          f" ({exc})") from exc
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=max(timeout_s, 10.0),
                                      health_check_interval=30)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise EngineError(f"cannot reach the Redis store {redact(url)!r}: {exc}") from exc
    return client


def check_broker(url: str, timeout_s: float = 3.0) -> None:
    """Fail fast on an unreachable broker (Redis: PING; AMQP: open and close a connection).

    Raises
    ------
    EngineError
        Naming the URL and the reason.
    """
    if url.split("://", 1)[0] in ("redis", "rediss"):
        connect(url, timeout_s).close()
        return
    try:
        from kombu import Connection
    except ImportError as exc:
        raise EngineError(f"the celery engine needs the scale-out extra ({exc})") from exc
    try:
        with Connection(url, connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:  # kombu raises transport-specific errors
        raise EngineError(f"cannot reach the broker {redact(url)!r}: {exc}") from exc


def server_run_id(client: "redis.Redis") -> str:
    """The Redis server's run id: it changes whenever the server restarts."""
    return str(client.info("server").get("run_id", ""))


def put_blob(client: "redis.Redis", key: str, data: bytes, ttl_s: float, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Store ``data`` under ``key`` as chunks + a JSON manifest, all expiring after ``ttl_s``."""
    n = max(1, -(-len(data) // chunk_bytes))
    ttl = max(1, int(ttl_s))
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{key}:{i}", data[i * chunk_bytes:(i + 1) * chunk_bytes], ex=ttl)
    pipe.execute()
    manifest = {"chunks": n, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "at": time.time()}
    client.set(key, json.dumps(manifest), ex=ttl)  # last: a blob is there only when all of it is


def get_blob(client: "redis.Redis", key: str) -> bytes | None:
    """The bytes stored by :func:`put_blob`, or None when missing, expired or incomplete."""
    raw = client.get(key)
    if raw is None:
        return None
    manifest = json.loads(raw)
    parts = client.mget([f"{key}:{i}" for i in range(int(manifest["chunks"]))])
    if any(p is None for p in parts):
        return None
    data = b"".join(parts)  # type: ignore[arg-type]
    if len(data) != manifest["size"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        return None
    return data


def delete_blob(client: "redis.Redis", key: str) -> None:
    """Delete a blob and its chunks (missing keys are fine)."""
    raw = client.get(key)
    n = int(json.loads(raw)["chunks"]) if raw else 0
    client.delete(key, *[f"{key}:{i}" for i in range(max(n, 1))])


def pack_files(files: Sequence[Path], names: Sequence[str] | None = None) -> bytes:
    """A zip archive (stored, not deflated: DICOM pixel data is often compressed already)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, path in enumerate(files):
            zf.write(path, arcname=names[i] if names else f"{i:06d}.dcm")
    return buf.getvalue()


def unpack_files(data: bytes, out_dir: Path, write: Callable[[Path, bytes], None] | None = None) -> list[Path]:
    """Extract an archive of :func:`pack_files` into ``out_dir``; return the files in archive order.

    ``write(path, data)`` writes one file (default ``Path.write_bytes``; the node passes its
    fsyncing :func:`sci_node.store.write_durable`).

    Raises
    ------
    EngineError
        An entry name that is not a plain file name (no folders, no ``..``).
    """
    make_private_dirs(out_dir)  # the results of a job are patient data: 0700 from the start
    paths = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            name = info.filename
            if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
                raise EngineError(f"archive entry {name!r} is not a plain file name")
            target = out_dir / name
            if write is None:
                target.write_bytes(zf.read(info))
            else:
                write(target, zf.read(info))
            paths.append(target)
    return paths


def push_event(client: "redis.Redis", keys: Keys, event: Mapping[str, Any]) -> None:
    """Append one JSON event (``started``, ``refused``, ``result``) for the node."""
    client.rpush(keys.events, json.dumps(dict(event), default=str))
