"""The Celery application the gateway and the workers build from the same settings.

Reliability settings (docs/scale-out.md, "What happens when"):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only after it ran;
  a worker killed mid-task leaves it unacknowledged, so the broker hands it out again.
* ``worker_prefetch_multiplier = 1``: a worker holds one task beyond those it runs, so a backlog
  spreads over the workers instead of queueing behind the first.
* Redis ``visibility_timeout`` = the lease: an unacknowledged task goes back to the queue then.
  The node does not wait for that: it re-dispatches a job whose worker stopped beating
  (``gateway``), and cancels the old token, so the redelivered copy is skipped.
* No result backend: results travel through the payload store as events (``store``).
* ``rediss://`` (TLS): ``broker_use_ssl`` from the URL's redis-py query parameters
  (``ssl_cert_reqs``, default ``required``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``), so
  Celery verifies the server as redis-py does. An ACL user and password go in the URL
  (``rediss://USER:PASSWORD@HOST:6380/0``) for both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sci_node.config import EngineConfig
from sci_node.engine.redis_store import ssl_options
from sci_node.errors import EngineError

if TYPE_CHECKING:
    from celery import Celery


def make_app(eng: EngineConfig) -> "Celery":
    """A Celery app on ``eng.broker_url`` with the settings above (no task registered).

    Raises
    ------
    EngineError
        Celery is not installed (the ``scale-out`` extra) or no broker URL is configured.
    """
    if not eng.broker_url:
        raise EngineError("no broker URL: give --broker redis://HOST:PORT/DB or [engine] broker_url")
    try:
        from celery import Celery
    except ImportError as exc:
        raise EngineError(f"the celery engine needs the scale-out extra: pip install 'sci-node[scale-out]' ({exc})") \
            from exc
    app = Celery("sci_node", broker=eng.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=eng.queue,
        task_create_missing_queues=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={"visibility_timeout": int(eng.lease_seconds)},
        broker_heartbeat=10,
        enable_utc=True,
    )
    ssl_opts = ssl_options(eng.broker_url)
    if ssl_opts is not None:
        app.conf.broker_use_ssl = ssl_opts
    return app
