"""Series state in the index: receiving -> complete (a job enqueued), re-opened by a late instance, purged.

series: ``receiving`` -> ``complete`` (-> ``receiving`` again, generation + 1, when a late
or re-sent instance arrives). Retention purges a complete, delivered series' files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sci_node.store.outbox import _refresh_delivery
from sci_node.store.spool import _safe_name
from sci_node.store.transactions import IndexBase


@dataclass(frozen=True)
class SeriesRow:
    """A series waiting for completion."""

    series_uid: str
    study_uid: str
    generation: int
    n_instances: int
    last_received_at: float
    calling_aet: str | None
    #: when the last association that sent instances of this series ended in A-ABORT (None:
    #: released normally, or a later association released)
    aborted_at: float | None = None



class SeriesState(IndexBase):
    """The series part of :class:`~sci_node.store.Store`: completion, supersession, retention."""

    def quiet_series(self, received_before: float, aborted_before: float | None = None) -> list[SeriesRow]:
        """Series still receiving whose last instance arrived before ``received_before`` (epoch s).

        With ``aborted_before``, a series whose last association was aborted is only quiet once
        that abort happened before ``aborted_before`` (the grace period for a resend is over).
        """
        rows = self._query("SELECT * FROM series WHERE state='receiving' AND last_received_at <= ?"
                           " AND (aborted_at IS NULL OR aborted_at <= ?) ORDER BY last_received_at",
                           (received_before, float("inf") if aborted_before is None else aborted_before))
        writer = self._writer  # a series with acknowledged instances still queued for write-behind is not quiet
        return [SeriesRow(r["series_uid"], r["study_uid"], r["generation"], r["n_instances"],
                          r["last_received_at"], r["calling_aet"], r["aborted_at"]) for r in rows
                if writer is None or not writer.pending_in(r["series_uid"])]

    def association_ended(self, series_uids: Sequence[str], aborted: bool) -> None:
        """Record how the association that sent instances of ``series_uids`` ended.

        An A-ABORT (ours or the peer's) marks those still receiving as aborted now (their
        completion waits for a resend, see :meth:`quiet_series`); a normal release clears the
        mark: the last association delivered what it meant to. With write-behind this is queued behind
        the association's instances (their rows come first).
        """
        if not series_uids:
            return
        uids, when = tuple(series_uids), time.time() if aborted else None
        if self._writer is not None:
            self._writer.submit(lambda: self._record_association_end(uids, when))
        else:
            self._record_association_end(uids, when)

    def _record_association_end(self, series_uids: tuple[str, ...], aborted_at: float | None) -> None:
        marks = ",".join("?" * len(series_uids))
        with self._tx() as db:
            db.execute(f"UPDATE series SET open_associations = MAX(open_associations - 1, 0) "
                       f"WHERE series_uid IN ({marks})", series_uids)
            db.execute(f"UPDATE series SET aborted_at=? WHERE state='receiving' AND series_uid IN ({marks})",
                       (aborted_at, *series_uids))

    def cut_by_restart(self, now: float | None = None) -> list[str]:
        """At start: series whose association was still open when the node stopped (a crash, a kill) are
        treated like aborted ones. Returns their UIDs.

        Each gets ``aborted_at`` = ``now``, so it waits ``abort_grace_seconds`` from this start for a
        resend, and completes flagged "incomplete transfer" if none comes (:meth:`quiet_series`).
        Series whose last association was released (the sender was done) are left alone.
        """
        when = time.time() if now is None else now
        with self._tx() as db:
            cut = [r[0] for r in db.execute("SELECT series_uid FROM series WHERE open_associations > 0 "
                                            "AND state='receiving'")]
            db.execute("UPDATE series SET aborted_at=? WHERE open_associations > 0 AND state='receiving'", (when,))
            db.execute("UPDATE series SET open_associations=0 WHERE open_associations > 0")
        return cut

    def series_files(self, series_uid: str) -> list[Path]:
        """Absolute paths of every spooled instance of a series (sorted by SOP instance UID)."""
        rows = self._query("SELECT path FROM instances WHERE series_uid=? ORDER BY sop_uid", (series_uid,))
        return [self.data_dir / r["path"] for r in rows]

    def complete_series(self, series: SeriesRow, geometry: Mapping[str, Any],
                        invalid_reason: str | None = None) -> int | None:
        """Mark a series complete and enqueue its job, superseding earlier jobs of the series.

        Does nothing (returns None) when an instance arrived since ``series`` was read: the
        series is still receiving. A job with ``invalid_reason`` is created already failed.

        Returns
        -------
        int | None
            The new job id.
        """
        now = time.time()
        with self._tx() as db:
            cur = db.execute("UPDATE series SET state='complete', completed_at=?, aborted_at=NULL WHERE series_uid=?"
                             " AND state='receiving' AND generation=? AND last_received_at=?",
                             (now, series.series_uid, series.generation, series.last_received_at))
            if cur.rowcount != 1:
                return None
            n = db.execute("SELECT n_instances FROM series WHERE series_uid=?", (series.series_uid,)).fetchone()[0]
            state = "failed" if invalid_reason else "pending"
            cur = db.execute(
                "INSERT INTO jobs (series_uid, study_uid, generation, n_instances, state, reason, created_at,"
                " finished_at, geometry) VALUES (?,?,?,?,?,?,?,?,?)",
                (series.series_uid, series.study_uid, series.generation, n, state, invalid_reason, now,
                 now if invalid_reason else None, json.dumps(dict(geometry))))
            job_id = int(cur.lastrowid or 0)
            self._supersede(db, series.series_uid, job_id)
        return job_id

    @staticmethod
    def _supersede(db: sqlite3.Connection, series_uid: str, new_job: int) -> None:
        old = db.execute("SELECT id FROM jobs WHERE series_uid=? AND id<? AND superseded_by IS NULL",
                         (series_uid, new_job)).fetchall()
        for (job_id,) in old:
            db.execute("UPDATE jobs SET superseded_by=? WHERE id=?", (new_job, job_id))
            db.execute("UPDATE jobs SET state='superseded', reason=? WHERE id=? AND state='pending'",
                       (f"superseded by job {new_job}", job_id))
            db.execute("UPDATE outbox SET state='cancelled', last_error=? WHERE job_id=? AND state='pending'",
                       (f"superseded by job {new_job}", job_id))
            _refresh_delivery(db, job_id)

    # -- retention ------------------------------------------------------------------------

    def expired_series(self, cutoff: float) -> list[tuple[str, int]]:
        """Complete series whose latest job is finished and delivered (or routed out with nothing
        to deliver) since before ``cutoff`` (epoch s): ``(series_uid, generation)`` pairs.

        Series whose latest job failed, is pending/running or still has results to send are kept.
        """
        rows = self._query(
            "SELECT s.series_uid, s.generation FROM series s JOIN jobs j ON j.id ="
            " (SELECT MAX(id) FROM jobs WHERE series_uid = s.series_uid)"
            " WHERE s.state='complete' AND j.generation = s.generation AND j.finished_at IS NOT NULL"
            " AND (j.delivery='delivered' OR (j.state='routed-out' AND j.delivery='none'))"
            " AND COALESCE((SELECT MAX(sent_at) FROM outbox WHERE job_id=j.id), j.finished_at) <= ?",
            (cutoff,))
        return [(r[0], int(r[1])) for r in rows]

    def purge_series(self, series_uid: str, generation: int) -> bool:
        """Delete a complete series' spooled instances and its jobs' result folders (retention).

        The series folder is moved aside and its rows deleted in one locked transaction, only
        if the series is still complete at ``generation``: an instance arriving meanwhile either
        re-opened the series first (nothing is purged) or finds its file gone and is refused
        (:meth:`_record_instance`), never acknowledged and lost; its journal record is then voided
        (:meth:`~sci_node.store.spool.Spool.spool_instance`), so a replay does not write it back. Job and
        outbox rows stay (audit).

        Returns
        -------
        bool
            False when the series changed meanwhile and was kept.
        """
        trash = self.data_dir / f".purge-{uuid.uuid4().hex}"
        writer = self._writer
        if writer is not None and writer.pending_in(series_uid):
            return False  # an instance of it is queued: it re-opens the series
        if self.journal is not None:  # no journal record of the series may outlive its files (replay); outside
            self.journal.checkpoint()  # the lock: it may wait for the write-behind thread, which takes it
        with self._tx() as db:
            row = db.execute("SELECT study_uid FROM series WHERE series_uid=? AND state='complete'"
                             " AND generation=?", (series_uid, generation)).fetchone()
            if row is None or (writer is not None and writer.pending_in(series_uid)):
                return False  # re-opened, or an instance appended since the checkpoint is queued
            series_dir = self.spool_dir / _safe_name(row["study_uid"]) / _safe_name(series_uid)
            job_ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE series_uid=?", (series_uid,))]
            os.mkdir(trash, 0o700)
            if series_dir.exists():
                os.replace(series_dir, trash / "spool")
            try:
                db.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))
                db.execute("DELETE FROM series WHERE series_uid=?", (series_uid,))
                self._remember_count(series_uid, None)
            except BaseException:
                if (trash / "spool").exists():
                    os.replace(trash / "spool", series_dir)
                raise
        for job_id in job_ids:
            if (self.results_dir / str(job_id)).exists():
                os.replace(self.results_dir / str(job_id), trash / f"result-{job_id}")
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):
            series_dir.parent.rmdir()  # the study folder, if that was its last series
        return True

