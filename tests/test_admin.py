"""``sci-node jobs show`` (sci_node.cli.admin) through ``main(argv)`` on a real index."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sci_node.cli import main
from sci_node.store import InstanceKey, Store


def test_jobs_show_gives_the_next_retry_of_a_pending_delivery(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    store = Store(data)
    key = InstanceKey("1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    store.spool_instance(key, b"\0" * 128 + b"DICM")
    (row,) = store.quiet_series(1e12)
    store.complete_series(row, {})
    job = store.finish_job(store.claim_job().id, "done", None, {"status": "done"}, [tmp_path / "seg.dcm"],
                           ["DEST@127.0.0.1:11113", "OTHER@127.0.0.1:11114"])
    retrying, sent = store.outbox_for_job(job.id)
    next_at = time.time() + 3600
    store.mark_retry(retrying.id, "connection refused", next_at)  # a transient failure: retried later
    store.mark_sent(sent.id)
    store.close()

    assert main(["jobs", "show", str(job.id), "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    (dest_line,) = [x for x in out.splitlines() if "DEST@" in x]
    (other_line,) = [x for x in out.splitlines() if "OTHER@" in x]
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(next_at))
    assert f"next retry {local} (in 3600 s)" in dest_line or f"next retry {local} (in 3599 s)" in dest_line, out
    assert "pending" in dest_line and "attempts 1" in dest_line and "(connection refused)" in dest_line
    assert "next" not in other_line and "sent" in other_line
    assert f"delivery     pending (next attempt {local})" in out

    assert main(["jobs", "show", str(job.id), "--data-dir", str(data), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(next_at))
    assert doc["next_attempt"] == iso
    assert [d["next_attempt"] for d in doc["deliveries"]] == [iso, None]
    assert doc["deliveries"][0]["next_attempt_at"] == pytest.approx(next_at)
