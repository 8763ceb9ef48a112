"""Engines: what runs a complete series' job. ``local`` runs it in the node's own worker threads (the
default); with ``[engine] kind = "celery"`` the node is a DICOM gateway and inference runs on
``sci-node worker`` processes.

With the celery engine the node keeps the SCP, the spool, series completion, the job table (the
source of truth) and the export outbox; each complete series is dispatched as a Celery task instead
of running in-process (docs/scale-out.md). Modules:

``local``        the local engine: worker threads run the processor (the pipeline) on claimed jobs
``redis_store``  the Redis adapter: key names, chunked blobs with an expiry, zip packing
``app``          the Celery application both sides build from the broker URL
``ledger``       the node's dispatch rows in its SQLite index (one result accepted per job)
``gateway``      the node side: dispatch, result collection, leases, heartbeats, broker restarts
``remote``       the worker side: ``sci-node worker`` and the task it runs
``status``       what ``sci-node status`` shows of the engine

Imports the core, store/, models/ and pipeline/. The local engine imports nothing of the others:
Celery and redis-py are needed only with ``kind = "celery"`` (the ``scale-out`` extra).
"""
from __future__ import annotations

TASK_NAME = "sci_node.process_series"
#: the running gateway's ``[engine]`` settings in its data dir (0600), written at its start and removed
#: by a node started with the local engine: ``sci-node status --data-dir D`` and the Orthanc plugin's
#: page show the engine the node runs, whatever config they were given
ENGINE_FILE = "engine.json"
