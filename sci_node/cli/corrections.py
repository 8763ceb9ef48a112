"""``sci-node corrections list|show|export|ingest|accept|reject|purge``: the presenters (the export itself is
:mod:`sci_node.corrections.export`).

What they print goes through :mod:`sci_node.terminal`: a correction's creator, reason and UIDs come from
a SEG someone stored, so their control characters are escaped.
"""
from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from sci_node.config import NodeConfig
from sci_node.corrections.export import export_corrections
from sci_node.corrections.index import all_corrections, open_index, purge_expired, summary
from sci_node.terminal import echo, echo_json, printable


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def list_corrections(cfg: NodeConfig, as_json: bool = False, limit: int | None = None) -> int:
    """Every correction (pending, accepted, rejected, refused, expired), newest first, and the summary."""
    rows = all_corrections(cfg)[:limit] if limit else all_corrections(cfg)
    if as_json:
        echo_json({"corrections": [c.to_dict() for c in rows], "summary": summary(cfg)})
        return 0
    echo(f"corrections   {summary_line(summary(cfg))}")
    if not rows:
        echo("no corrections")
        return 0
    echo(f"  {'id':>4}  {'state':<9} {'received':<19}  {'cord Dice':>9} {'+les':>4} {'-les':>4}  "
         f"{'sender':<24} source series / reason / flags")
    for c in rows:
        m = c.measures
        dice = f"{m['cord_dice']:.3f}" if "cord_dice" in m else "-"
        sender = printable(c.sender or "-")[:24]  # escaped before it is cut: no half escape sequence
        why = c.reason or ("FLAGGED: " + "; ".join(c.flags) if c.flags and c.state == "pending" else "")
        echo(f"  {c.id:>4}  {c.state:<9} {_ts(c.received_at):<19}  {dice:>9} "
             f"{m.get('lesions_added', '-'):>4} {m.get('lesions_removed', '-'):>4}  "
             f"{sender:<24} {c.source_series_uid or '-'}" + (f"  ({printable(why)})" if why else ""))
    return 0


def show_correction(cfg: NodeConfig, correction_id: int, as_json: bool = False) -> int:
    """One correction with its measures, model versions and files."""
    index = open_index(cfg)
    try:
        c = index.get(correction_id)
    finally:
        index.close()
    files = sorted(str(p.relative_to(c.path)) for p in Path(c.path).rglob("*") if p.is_file()) if c.path else []
    if as_json:
        echo_json(c.to_dict() | {"files": files})
        return 0
    echo(f"correction {c.id}: {c.state}" + (f" ({c.reason})" if c.reason else ""))
    for key in ("sender", "origin", "creator", "created", "study_uid", "source_series_uid", "seg_series_uid",
                "seg_sop_uid", "job_id", "verdict", "reviewed_by", "path"):
        echo(f"  {key:<18} {getattr(c, key) or '-'}")
    echo(f"  {'received':<18} {_ts(c.received_at)}")
    if c.reviewed_at:
        echo(f"  {'reviewed':<18} {_ts(c.reviewed_at)}")
    for key in ("model_versions", "measures", "notes", "flags"):
        if getattr(c, key):
            echo(f"  {key:<18} {json.dumps(getattr(c, key), default=str)}")
    if files:
        echo(f"  {'files':<18} {len(files)} ({', '.join(f for f in files if '/' not in f)})")
    return 0


def login() -> str:
    """``cli:LOGIN``: the admin at the shell (the process's user)."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return f"cli:uid{os.getuid()}"


def ingest_files(cfg: NodeConfig, paths: Sequence[Path], origin: str = "cli", as_json: bool = False,
                 sender: str | None = None) -> int:
    """``ingest FILE...``: 0 when every file was kept (pending), a duplicate or ignored; 1 if one was refused.

    ``sender`` (``orthanc-user:NAME`` / ``dicom:AET@IP``) is who stored the files; without it an
    ingest by hand (``origin`` cli) is the admin's own (``cli:LOGIN``), any other is unauthenticated.
    """
    from sci_node.corrections.ingest import ingest_correction
    from sci_node.corrections.trust import parse_sender

    who = parse_sender(sender if sender is not None else (login() if origin == "cli" else None))
    outcomes = [ingest_correction(cfg, Path(p), origin, who) for p in paths]
    if as_json:
        echo_json([o.to_dict() for o in outcomes], indent=None)
    else:
        for p, o in zip(paths, outcomes):
            cid = f" as correction {o.correction.id}" if o.correction else ""
            echo(f"{p}: {o.state}{cid}" + (f" ({o.reason})" if o.reason else ""))
    return 1 if any(o.state == "refused" for o in outcomes) else 0


def review(cfg: NodeConfig, ids: Sequence[int], action: str, by: str | None = None, force: bool = False,
           as_json: bool = False) -> int:
    """``accept|reject ID...``: decide pending corrections; 0 when every one changed, else 1 (reasons printed).

    Raises
    ------
    CorrectionNotFoundError
        An id that does not exist (nothing after it is decided).
    """
    from sci_node.errors import CorrectionRefused

    verdict = "accepted" if action == "accept" else "rejected"
    index = open_index(cfg)
    results: list[dict[str, Any]] = []
    try:
        for cid in ids:
            try:
                c = index.review(cid, verdict, by or login(), force=force)
                results.append({"id": cid, "state": c.state, "reviewed_by": c.reviewed_by, "error": None})
            except CorrectionRefused as exc:
                results.append({"id": cid, "state": index.get(cid).state, "reviewed_by": None, "error": str(exc)})
    finally:
        index.close()
    if as_json:
        echo_json(results, indent=None)
    else:
        for r in results:
            echo(f"correction {r['id']}: {r['state']}" + (f" ({printable(r['error'])})" if r["error"] else ""))
    return 1 if any(r["error"] for r in results) else 0


def purge(cfg: NodeConfig) -> int:
    """``purge``: apply ``[corrections] retention_days`` now."""
    index = open_index(cfg)
    try:
        n = purge_expired(cfg, index)
    finally:
        index.close()
    echo(f"{n} correction(s) past retention purged")
    return 0


def summary_line(s: dict[str, Any]) -> str:
    """One line for ``sci-node status``."""
    mean = s.get("mean_cord_dice_last_n")
    text = (f"{s['counted']} accepted, {s['to_review']} to review"
            + (f" ({s['flagged']} flagged)" if s.get("flagged") else "")
            + f", {s['rejected']} rejected, {s['refused']} refused"
            + (f"; mean cord Dice original vs corrected (last {s['window']} accepted) {mean:.3f}"
               if mean is not None else ""))
    if s.get("heavily_corrected"):
        text += f"; HEAVILY CORRECTED cord {', '.join(s['heavily_corrected'])}"
    return text


def export_cli(cfg: NodeConfig, out: Path, deidentify: bool = True) -> int:
    """``export DIR [--no-deidentify]``."""
    images = export_corrections(cfg, out, deidentify)
    how = "de-identified" if deidentify else "WITH patient identity"
    echo(f"exported {len(images)} correction(s) to {out} ({how})")
    return 0
