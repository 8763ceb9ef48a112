"""The node's state on disk: the spool of received instances and the SQLite index (series, jobs, outbox).

Imports only the core (no torch, no DICOM network code). ``sci_node.store`` re-exports the API.
"""
from __future__ import annotations

from sci_node.store.index import SCHEMA_VERSION, Store
from sci_node.store.jobs import TERMINAL_JOB_STATES, Job, finish_in
from sci_node.store.outbox import OutboxEntry
from sci_node.store.series_state import SeriesRow
from sci_node.store.spool import InstanceKey, write_durable

__all__ = ["SCHEMA_VERSION", "TERMINAL_JOB_STATES", "InstanceKey", "Job", "OutboxEntry", "SeriesRow", "Store",
           "finish_in", "write_durable"]
