"""``sci-node compare PRIOR CURRENT --out OUT``: what changed since the prior scan, offline (issue 39).

Each of PRIOR and CURRENT is a folder (or file) holding one series the node can segment: a DICOM
series or a NIfTI volume. Both go through the node's own pipeline (as ``sci-node infer``: their
results in ``OUT/prior/`` and ``OUT/current/``), then :func:`sci_node.imaging.followup.compare`
registers the prior to the current series on the cord, checks the registration, and classifies
every lesion as new, enlarging, stable, shrinking or resolved. Written:

* ``OUT/comparison.json``: the registration check (and the refusal's reason when it fails), the
  counts, every lesion with its volume then and now, status and current LPS position, the C2-C3
  mean CSA then, now and its change (when both scans have vertebral levels), per level, and the
  mean CSA over each scan's cord (comparable when both cover the same stretch);
* ``OUT/new_or_enlarging.nii.gz``: the new and enlarging lesions on the current series' grid.

Exit code 0 when compared, 1 when the comparison was refused (registration check failed, or a
side has no segmented series); the reason is printed and in the JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import SimpleITK as sitk

from sci_node.config import NodeConfig
from sci_node.errors import DataError
from sci_node.imaging import followup
from sci_node.imaging.measure import index_to_lps, si_axis
from sci_node.terminal import echo_all


def _segment(pipeline: Any, source: Path, out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The one series under ``source`` through the pipeline: ``(Segmented, summary)``.

    Raises
    ------
    DataError
        Not exactly one series, or it was not segmented (routed out, or failed).
    """
    from sci_node.pipeline.batch import find_inputs

    items = find_inputs(source)
    if len(items) != 1:
        raise DataError(f"{str(source)!r} holds {len(items)} series; compare takes one prior and one current series")
    item = items[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    res = (pipeline.run_dicom(list(item.files), out_dir) if item.kind == "dicom"
           else pipeline.run_nifti(item.files[0], out_dir))
    summary = dict(res.summary)
    (out_dir / "report.json").write_text(json.dumps({"source": str(source), "status": res.status, "reason": res.reason,
                                                     "model_versions": res.model_versions, "summary": summary},
                                                    indent=2, default=str) + "\n", encoding="utf-8")
    if res.segmented is None:
        raise DataError(f"{str(source)!r}: the series was not segmented ({res.status}: {res.reason})")
    return res.segmented, summary


def _lps(image: sitk.Image, zyx: tuple[float, float, float]) -> list[float]:
    return [round(v, 2) for v in image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])]


def _per_level(then: dict[str, Any], now: dict[str, Any]) -> list[dict[str, Any]]:
    before = {v["level"]: v.get("csa_mm2_mean") for v in then.get("vertebral_levels") or []}
    return [{"level": v["level"], **followup.csa_change(before[v["level"]], v.get("csa_mm2_mean"))}
            for v in now.get("vertebral_levels") or [] if v["level"] in before]


def _reported(lps: list[float] | None, now: dict[str, Any], within_mm: float = 5.0) -> dict[str, Any]:
    """``centroid_lps_mm`` and, for a current lesion, the report's own lesion there (nearest centroid within
    ``within_mm``): its ``lesion_id`` (the id in report.json and the SR) and ``vertebral_levels``."""
    out: dict[str, Any] = {"centroid_lps_mm": lps, "lesion_id": None, "vertebral_levels": []}
    lesions = [les for les in now.get("lesions") or [] if les.get("centroid_lps_mm")]
    if lps is None or not lesions:
        return out
    near = min(lesions, key=lambda les: float(np.linalg.norm(np.subtract(les["centroid_lps_mm"], lps))))
    if float(np.linalg.norm(np.subtract(near["centroid_lps_mm"], lps))) <= within_mm:
        out.update(lesion_id=near.get("id"), vertebral_levels=list(near.get("vertebral_levels") or []))
    return out


def comparison_record(result: followup.Comparison, current: sitk.Image, then: dict[str, Any],
                      now: dict[str, Any], rules: followup.FollowupRules = followup.FollowupRules()) -> dict[str, Any]:
    """The JSON of ``comparison.json`` (see the module docstring)."""
    check = result.check
    return {
        "compared": check.passed,
        "reason": None if check.passed else f"registration check failed: {check.reason}",
        "registration": {"cord_dice": check.cord_dice, "centerline_mm": check.centerline_mm,
                         "rigid_parameters": list(result.transform), "rules": vars(rules)},
        "counts": result.counts() if check.passed else None,
        "lesions": [{"status": c.status, "volume_then_mm3": c.volume_then_mm3, "volume_now_mm3": c.volume_now_mm3,
                     "current_id": c.current_id, "prior_ids": list(c.prior_ids), "found_by": c.found_by,
                     **_reported(_lps(current, c.centroid_index_zyx) if c.status != "resolved" else None,
                                 now if c.current_id else {})}
                    for c in result.lesions],
        "csa_c2_c3": followup.with_error(followup.csa_change(then.get("csa_c2_c3_mm2"), now.get("csa_c2_c3_mm2")),
                                         rules.csa_error_pct),
        # the mean over the stretch both scans cover, the prior moved onto the current grid
        "csa_common_stretch": followup.with_error(result.csa_common, rules.csa_error_pct) if result.csa_common
        else None,
        # the mean over each scan's whole cord: comparable when both cover the same stretch (a rescan)
        "csa_mean": followup.with_error(followup.csa_change((then.get("csa_mm2") or {}).get("mean"),
                                                           (now.get("csa_mm2") or {}).get("mean")),
                                        rules.csa_error_pct),
        "csa_per_level": _per_level(then, now),
    }


def compare_results(prior_files: list[Path], prior_dir: Path, current_files: list[Path], current_dir: Path,
                    prior_summary: dict[str, Any], current_summary: dict[str, Any],
                    max_missing_fraction: float) -> dict[str, Any]:
    """The node's follow-up of one job against a prior job of the same person (both already segmented).

    Reads both series (their spooled DICOM files) and each job's ``cord.nii.gz`` / ``lesion.nii.gz``
    from its result folder, compares them (:func:`sci_node.imaging.followup.compare`) and writes
    ``comparison.json`` and ``new_or_enlarging.nii.gz`` into ``current_dir``. Returns the record.

    Raises
    ------
    SciNodeError
        A series does not read, or a job's masks are missing or not on its series' grid.
    """
    from sci_node.pipeline.series import read_series

    def side(files: list[Path], folder: Path) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
        image = read_series(files, max_missing_fraction).image
        masks = []
        for name in ("cord.nii.gz", "lesion.nii.gz"):
            path = folder / name
            arr = (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) if path.is_file()
                   else np.zeros(image.GetSize()[::-1], np.uint8))
            if arr.shape != image.GetSize()[::-1]:
                raise DataError(f"{path}: {arr.shape} is not on its series' grid {image.GetSize()[::-1]}")
            masks.append(arr.astype(np.uint8))
        return image, masks[0], masks[1]

    started = time.perf_counter()
    prior = side(prior_files, prior_dir)
    current = side(current_files, current_dir)
    return compare_and_write(prior, current, prior_summary, current_summary, current_dir, started)


def compare_and_write(prior: tuple[sitk.Image, np.ndarray, np.ndarray | None],
                      current: tuple[sitk.Image, np.ndarray, np.ndarray | None], prior_summary: dict[str, Any],
                      current_summary: dict[str, Any], out_dir: Path, started: float | None = None,
                      rules: followup.FollowupRules = followup.FollowupRules()) -> dict[str, Any]:
    """Compare ``(image, cord, lesion)`` of the prior and the current series (lesion None: none found), write
    ``out_dir/comparison.json`` and ``out_dir/new_or_enlarging.nii.gz``; return the record.

    ``compare_seconds`` counts from ``started`` (``time.perf_counter()``; default: now, i.e. the
    registration and matching only).
    """
    started = time.perf_counter() if started is None else started
    (p_img, p_cord, p_les), (c_img, c_cord, c_les) = prior, current
    axis = si_axis(index_to_lps(c_img.GetOrigin(), c_img.GetSpacing(), c_img.GetDirection()))
    result = followup.compare(p_img, p_cord, np.zeros_like(p_cord) if p_les is None else p_les,
                              c_img, c_cord, np.zeros_like(c_cord) if c_les is None else c_les, axis, rules)
    record = comparison_record(result, c_img, prior_summary, current_summary, rules)
    record["compare_seconds"] = round(time.perf_counter() - started, 3)
    (out_dir / "comparison.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if result.new_or_enlarging is not None:
        mask = sitk.GetImageFromArray(result.new_or_enlarging.astype(np.uint8))
        mask.CopyInformation(c_img)
        sitk.WriteImage(mask, str(out_dir / "new_or_enlarging.nii.gz"), True)
    return record


COMPARISON_SR_NAME = "comparison-sr.dcm"
NEW_OR_ENLARGING_SEG_NAME = "new-or-enlarging-seg.dcm"


def write_comparison_dicom(record: dict[str, Any], prior_files: list[Path], current_files: list[Path],
                           out_dir: Path, versions: dict[str, str], max_missing_fraction: float) -> tuple[Path, Path]:
    """Write the follow-up's DICOM into ``out_dir``: the "New or enlarging lesion" SEG and the comparison SR.

    ``record`` is the compared record :func:`compare_and_write` wrote beside ``new_or_enlarging.nii.gz``
    (``(Z, Y, X)`` on the current series' grid; absent: nothing new or enlarging). Returns
    ``(SEG path, SR path)``.

    Raises
    ------
    SciNodeError
        The current series does not read or the mask is not on its grid. ``ValueError`` when the record
        was not compared.
    """
    import pydicom

    from sci_node.pipeline.comparison_seg import build_new_or_enlarging_seg
    from sci_node.pipeline.comparison_sr import build_comparison_sr
    from sci_node.pipeline.series import read_series

    volume = read_series(current_files, max_missing_fraction)
    prior = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in prior_files),
                   key=lambda d: int(d.get("InstanceNumber") or 0))
    path = out_dir / "new_or_enlarging.nii.gz"
    mask = (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) if path.is_file()
            else np.zeros(volume.image.GetSize()[::-1], np.uint8)).astype(np.uint8)
    seg = build_new_or_enlarging_seg(volume, mask, str(prior[0].get("StudyDate") or ""),
                                     str(prior[0].SeriesInstanceUID), versions)
    seg_path = out_dir / NEW_OR_ENLARGING_SEG_NAME
    seg.save_as(seg_path, enforce_file_format=True)
    sr = build_comparison_sr(record, list(volume.datasets), prior, versions)
    sr_path = out_dir / COMPARISON_SR_NAME
    sr.save_as(sr_path, enforce_file_format=True)
    return seg_path, sr_path


def run_compare(prior: Path, current: Path, out: Path, cfg: NodeConfig, device: str = "cpu",
                stream: TextIO | None = None, rules: followup.FollowupRules = followup.FollowupRules()) -> int:
    """``sci-node compare``: segment both, compare, write ``OUT/comparison.json`` (module docstring).

    Raises
    ------
    DataError
        A side does not hold exactly one segmentable series. ``ModelError`` when the models cannot load.
    """
    from sci_node.models.predict_seg import configure_threads
    from sci_node.models.registry import ModelRegistry
    from sci_node.pipeline.run import Pipeline

    stream = stream or sys.stdout
    configure_threads(cfg.torch_threads)
    pipeline = Pipeline(ModelRegistry(cfg.models_dir).load_active(device), cfg.routing, device,
                        cfg.max_missing_fraction)
    out = Path(out)
    seg_then, then = _segment(pipeline, Path(prior), out / "prior")
    seg_now, now = _segment(pipeline, Path(current), out / "current")
    record = compare_and_write((seg_then.image, seg_then.cord, seg_then.lesion),
                               (seg_now.image, seg_now.cord, seg_now.lesion), then, now, out, rules=rules)
    echo_all(_lines(record), stream)
    return 0 if record["compared"] else 1


def _lines(record: dict[str, Any]) -> list[str]:
    reg = record["registration"]
    lines = [f"registration: cord Dice {reg['cord_dice']}, centre lines {reg['centerline_mm']} mm apart"]
    if not record["compared"]:
        return [*lines, f"not compared: {record['reason']}"]
    lines.append("lesions: " + ", ".join(f"{n} {k}" for k, n in record["counts"].items()))
    for les in record["lesions"]:
        where = f"  lesion {les['lesion_id']}" if les.get("lesion_id") else ""
        where += f" ({', '.join(les['vertebral_levels'])})" if les.get("vertebral_levels") else ""
        then, now = les["volume_then_mm3"], les["volume_now_mm3"]
        lines.append(f"  {les['status']:<10} {then:>8.1f} -> {now:>8.1f} mm3{where}")
    for name, csa in (("C2-C3 mean CSA", record["csa_c2_c3"]), ("CSA over the common stretch",
                                                                  record.get("csa_common_stretch") or {})):
        if csa.get("change_pct") is not None:
            judged = "beyond" if csa.get("beyond_error") else "within"
            lines.append(f"{name} {csa['then_mm2']} -> {csa['now_mm2']} mm2 ({csa['change_pct']:+.1f} %, {judged} "
                         f"the {csa.get('smallest_real_change_pct')} % scan-rescan error)")
    return lines
