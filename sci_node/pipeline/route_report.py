"""``sci-node route INPUT [--json]``: the routing decision per series, without segmenting.

INPUT is handled as by ``sci-node infer`` (:func:`sci_node.pipeline.batch.find_inputs`): DICOM files in any
layout grouped by SeriesInstanceUID, NIfTI volumes (BIDS JSON sidecar as header evidence), label
files skipped. Per series the three active classifiers run through :func:`sci_node.routing.route`
with the node's ``[routing]`` rules, and the report gives, per level (anatomy, region, view,
sequence), the label (``None`` = abstained), its probability, all probabilities and what decided
it (the network, the MR-physics sequence rule or the anatomy header rule that fired), then the
routing rule that fired and the reason when the series is routed out (also by the localiser
guard, before any classifier runs). A series that cannot be read gets ``status: failed``
with the same reason ``sci-node infer`` gives. Nothing is segmented, so the cord-contrast check
(:func:`sci_node.routing.recheck_sequence`, which reads the CSF around the segmented cord) does not
run here: a network-decided sequence is shown as the network decided it, before that check.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

import structlog

from sci_node.config import NodeConfig, RoutingRules
from sci_node.errors import SciNodeError
from sci_node.terminal import echo_all, echo_json

log = structlog.get_logger("sci_node.route_report")
CLASSIFIERS = ("anatomy", "region_view", "sequence")
LEVELS = ("anatomy", "region", "view", "sequence")


def load_classifiers(models_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """The active ``anatomy``, ``region_view`` and ``sequence`` classifiers (no segmenter is loaded).

    Raises
    ------
    ModelError
        A classifier is not registered, not active or fails verification.
    """
    from sci_node.errors import ModelError
    from sci_node.models.predict_cls import Classifier
    from sci_node.models.registry import ModelRegistry

    reg = ModelRegistry(models_dir)
    active = reg.active()
    missing = [n for n in CLASSIFIERS if n not in active]
    if missing:
        raise ModelError(f"no active version of {', '.join(missing)} in {str(models_dir)!r}")
    return {n: Classifier.from_artifact(reg.path_of(n, active[n]), device=device) for n in CLASSIFIERS}


def route_series(classifiers: Mapping[str, Any], image: Any, evidence: Any, rules: RoutingRules) -> dict[str, Any]:
    """Routing report of one loaded series.

    Parameters
    ----------
    classifiers
        Model name -> :class:`sci_node.models.predict_cls.Classifier` (``anatomy``, ``region_view``, ``sequence``).
    image : SimpleITK.Image
        The series in patient LPS.
    evidence : HeaderEvidence | None
        Its header evidence.
    rules
        The node's routing rules.

    Returns
    -------
    dict
        ``levels`` (level -> label, probability, probs, decided_by; empty when the localiser guard
        routed the series out before any classifier), ``rule``, ``reason``, ``note`` (set when the
        series is routed in with a network-decided sequence that the cord-contrast check may still
        correct after segmentation; else None), ``slices``, ``segment_cord``, ``segment_lesions``, ``versions``.
    """
    from sci_node import routing
    from sci_node.models.predict_cls import decided_by_header_rule, explaining

    how: dict[str, str] = {}
    n_slices = routing.slice_count(image.GetSize())
    decision = routing.route(explaining(classifiers.__getitem__, image, evidence, how), rules, evidence=evidence,
                             n_slices=n_slices)
    levels = {h: {**d.as_dict(), "decided_by": d.decided_by or how.get(h, "network")}
              for h, d in decision.heads.items()}
    note = None
    if routing.contrast_check_applies(decision, rules, decided_by_header_rule(how.get("sequence", "network"))):
        note = ("the image network decided the sequence: after the cord is segmented (sci-node infer / serve), the "
                "cord-contrast check may still correct it to T1w or T2w (docs/classifiers.md)")
    return {"levels": levels, "rule": decision.rule, "reason": decision.reason, "note": note, "slices": n_slices,
            "segment_cord": decision.segment_cord, "segment_lesions": decision.segment_lesions,
            "versions": {n: c.version for n, c in classifiers.items()}}


def load_item(item: Any) -> tuple[Any, Any]:
    """Image and header evidence of a :class:`sci_node.pipeline.batch.BatchItem`, read as ``sci-node infer``
    reads it."""
    from sci_node.pipeline.run import _sidecar, read_nifti
    from sci_node.pipeline.series import read_series
    from sci_node.routing.evidence import HeaderEvidence

    if item.kind == "dicom":
        vol = read_series(list(item.files))
        return vol.image, HeaderEvidence.from_dicom(vol.first)
    sidecar = _sidecar(Path(item.files[0]))
    return read_nifti(Path(item.files[0])), (HeaderEvidence.from_bids_sidecar(sidecar) if sidecar is not None else None)


def route_inputs(input: Path, cfg: NodeConfig, device: str = "cpu") -> list[dict[str, Any]]:
    """Routing report of every series under ``input`` (see module docstring)."""
    import time

    from sci_node.pipeline.batch import find_inputs

    items = find_inputs(Path(input))
    classifiers = load_classifiers(cfg.models_dir, device)
    reports = []
    for item in items:
        rep: dict[str, Any] = {"name": item.name, "kind": item.kind, "source": item.key, "files": len(item.files)}
        t0 = time.perf_counter()
        try:
            image, evidence = load_item(item)
            rep.update(status="routed", **route_series(classifiers, image, evidence, cfg.routing))
            rep["status"] = "routed-out" if not rep["segment_cord"] else "routed-in"
        except SciNodeError as exc:
            rep.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        rep["seconds"] = round(time.perf_counter() - t0, 3)
        log.info("route", name=item.name, status=rep["status"], rule=rep.get("rule"), reason=rep.get("reason"))
        reports.append(rep)
    return reports


def report_lines(reports: list[dict[str, Any]]) -> list[str]:
    """Human-readable text: one block per series, one line per level (values as read: print them with
    :func:`sci_node.terminal.echo`, which escapes the control characters a header may carry)."""
    lines: list[str] = []
    for r in reports:
        lines.append(f"{r['name']}  [{r['kind']}, {r['files']} file(s)]  -> {r['status']}")
        for level in LEVELS:
            d = r.get("levels", {}).get(level)
            if d is None:
                continue
            probs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["probs"].items(), key=lambda kv: -kv[1]))
            label = d["label"] if d["label"] is not None else f"abstained (top p={d['probability']:.2f})"
            shown = f"[{probs}]  " if probs else ""
            lines.append(f"  {level:<9} {label:<12} {shown}by {d['decided_by']}")
        if "rule" in r:
            lines.append(f"  rule: {r['rule']}")
        if r.get("reason"):
            lines.append(f"  reason: {r['reason']}")
        if r.get("note"):
            lines.append(f"  note: {r['note']}")
    return lines


def run_route(input: Path, cfg: NodeConfig, as_json: bool = False, device: str = "cpu",
              stream: TextIO | None = None) -> int:
    """``sci-node route``: print the reports; exit code 0, or 1 when a series could not be read."""
    stream = stream or sys.stdout
    reports = route_inputs(input, cfg, device)
    if as_json:
        echo_json({"input": str(input), "series": reports}, stream)
    else:
        echo_all(report_lines(reports), stream)
    return 1 if any(r["status"] == "failed" for r in reports) else 0
