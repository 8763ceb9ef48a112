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

from sci_node.errors import EngineError

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
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    cred, _, host = tail.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{head}://{user + ':' if user else ''}***@{host}"


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
    out_dir.mkdir(parents=True, exist_ok=True)
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
