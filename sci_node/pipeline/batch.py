"""``sci-node infer INPUT --out OUTDIR``: the node's pipeline over every series in a folder.

DICOM files are found in any folder layout and grouped by SeriesInstanceUID; NIfTI volumes
(``*.nii``, ``*.nii.gz``) are processed too, except label-like files (under a
``derivatives`` folder, or named ``*mask*``, ``*_seg*``, ``*label*``, ``*lesion*``).

Per series, in ``OUTDIR/<series>/``: ``seg.dcm`` and ``sr.dcm`` (DICOM input only),
``cord.nii.gz`` / ``lesion.nii.gz``, ``preview_*.png`` overlays of key slices, and
``report.json`` (routing decisions with probabilities, lesion list, measurements, timings,
model versions). ``OUTDIR/report.json`` lists every series. A summary table goes to stdout;
routed-out series appear in it with their reason.

One process handles every series: imports and the five models are loaded once, so many series
belong in one ``sci-node infer`` (docs/benchmarks.md section 5: four series 8.3 s, as four
processes 17.2 s).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import structlog

from sci_node.config import NodeConfig
from sci_node.errors import DataError, SciNodeError
from sci_node.terminal import echo_all

log = structlog.get_logger("sci_node.batch")

_LABEL_RE = re.compile(r"(mask|_seg|label|lesion)", re.IGNORECASE)


@dataclass(frozen=True)
class BatchItem:
    """One unit of work: a DICOM series (several files) or one NIfTI file."""

    kind: str  # "dicom" | "nifti"
    key: str  # SeriesInstanceUID or the NIfTI path
    files: tuple[Path, ...]
    name: str  # output sub-folder name


def find_inputs(root: Path) -> list[BatchItem]:
    """Every DICOM series and NIfTI volume under ``root`` (a folder or one file).

    Raises
    ------
    DataError
        ``root`` does not exist or holds nothing to process.
    """
    from sci_node.pipeline.series import find_dicom_files

    root = Path(root)
    if not root.exists():
        raise DataError(f"input {str(root)!r} does not exist")
    items: list[BatchItem] = []
    names: set[str] = set()
    for uid, files in sorted(find_dicom_files(root).items(), key=lambda kv: str(kv[1][0])):
        items.append(BatchItem("dicom", uid, tuple(files), _unique(_dicom_name(files[0], uid), names)))
    niftis = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in niftis:
        if p.name.endswith((".nii", ".nii.gz")) and not _is_label(p, root):
            stem = p.name.removesuffix(".gz").removesuffix(".nii")
            items.append(BatchItem("nifti", str(p), (p,), _unique(_safe(stem), names)))
    if not items:
        raise DataError(f"no DICOM series or NIfTI volume found under {str(root)!r}")
    return items


def _is_label(path: Path, root: Path) -> bool:
    rel = path.relative_to(root) if path != root and root in path.parents else Path(path.name)
    return "derivatives" in rel.parts[:-1] or bool(_LABEL_RE.search(path.name))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "series"


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    taken.add(out)
    return out


def _dicom_name(path: Path, uid: str) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesNumber", "SeriesDescription"])
    number = ds.get("SeriesNumber")
    desc = str(ds.get("SeriesDescription") or "series")
    return _safe(f"{'' if number in (None, '') else f'{int(number):03d}_'}{desc}_{uid[-6:]}")


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class StartedBatch:
    """What :func:`start_batch` prepared: the inputs, the device and the pipeline with its models."""

    items: tuple[BatchItem, ...]
    device: str
    pipeline: Any


def start_batch(input: Path, cfg: NodeConfig, device: str = "cpu") -> StartedBatch:
    """Find the inputs (a bad one fails before anything loads), set torch's threads and load the
    five active models once for every series of the batch.

    Raises
    ------
    DataError
        Nothing to process. ``ModelError`` when the models cannot be loaded.
    """
    from sci_node.models.predict_seg import configure_threads
    from sci_node.models.registry import ModelRegistry
    from sci_node.pipeline.run import Pipeline

    items = tuple(find_inputs(Path(input)))
    device = _resolve_device(device)
    configure_threads(cfg.torch_threads)
    models = ModelRegistry(cfg.models_dir).load_active(device)
    return StartedBatch(items, device, Pipeline(models, cfg.routing, device, cfg.max_missing_fraction))


def run_batch(input: Path, out: Path, cfg: NodeConfig, device: str = "cpu", stream: TextIO | None = None,
              started: StartedBatch | None = None) -> int:
    """Run the pipeline on every series under ``input``; write results under ``out``.

    ``started``: what :func:`start_batch` returned for ``input`` (the CLI loads it while the
    garbage collector is paused); ``None`` starts here.

    Returns
    -------
    int
        0 when every series was processed or routed out, 1 when at least one failed
        (its error is in its report and the table).

    Raises
    ------
    DataError
        Nothing to process. ``ModelError`` when the models cannot be loaded.
    """
    from tqdm import tqdm

    stream = stream or sys.stdout
    started = started or start_batch(input, cfg, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for item in tqdm(started.items, desc="series", unit="series", disable=len(started.items) < 2, file=sys.stderr):
        reports.append(_run_one(started.pipeline, item, out / item.name))
    (out / "report.json").write_text(json.dumps({"input": str(input), "device": started.device,
                                                 "series": reports}, indent=2) + "\n", encoding="utf-8")
    echo_all(table_lines(reports), stream)  # reasons may carry a header's control characters: escaped
    return 1 if any(r["status"] == "failed" for r in reports) else 0


def _run_one(pipeline: Any, item: BatchItem, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"name": item.name, "kind": item.kind, "source": item.key,
                              "files": len(item.files), "model_versions": pipeline.versions}
    try:
        if item.kind == "dicom":
            res = pipeline.run_dicom(list(item.files), out_dir)
        else:
            res = pipeline.run_nifti(item.files[0], out_dir)
    except SciNodeError as exc:
        log.warning("series.failed", source=item.key, error=str(exc), error_type=type(exc).__name__)
        report.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        _write_json(out_dir / "report.json", report)
        return report
    previews = write_previews(res.segmented, out_dir) if res.segmented is not None else []
    summary = dict(res.summary)
    report.update(
        status=res.status, reason=res.reason, routing=res.routing,
        lesions=summary.pop("lesions", []), missing_slices=summary.pop("missing_slices", []),
        notes=list(getattr(res, "notes", ())), measurements=summary, timings=res.timings,
        model_versions=res.model_versions,
        outputs=[p.name for p in res.outputs], masks=[p.name for p in res.masks], previews=[p.name for p in previews])
    _write_json(out_dir / "report.json", report)
    return report


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def key_slices(cord: np.ndarray, lesion: np.ndarray | None, max_slices: int = 4) -> list[int]:
    """Z indices worth a preview: most cord, most lesion, and the cord extent's quartiles.

    ``cord``/``lesion``: ``(Z, Y, X)`` masks. Returns sorted unique indices (at most ``max_slices``).
    """
    per_z = cord.reshape(cord.shape[0], -1).sum(axis=1)
    zs = np.nonzero(per_z)[0]
    if zs.size == 0:
        return [cord.shape[0] // 2]
    picks = [int(np.argmax(per_z))]
    if lesion is not None and lesion.any():
        picks.append(int(np.argmax(lesion.reshape(lesion.shape[0], -1).sum(axis=1))))
    picks += [int(zs[int(q * (zs.size - 1))]) for q in (0.5, 0.25, 0.75)]
    out: list[int] = []
    for z in picks:
        if z not in out:
            out.append(z)
    return sorted(out[:max_slices])


def write_previews(seg: Any, out_dir: Path) -> list[Path]:
    """PNG overlays (cord green, lesion red) of :func:`key_slices` of a ``Segmented``."""
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: its import and global figure manager cost a cold start

    arr = sitk.GetArrayFromImage(seg.image)
    sx, sy = seg.image.GetSpacing()[:2]
    lo, hi = np.percentile(arr, [1, 99.5])
    paths = []
    for z in key_slices(seg.cord, seg.lesion):
        fig = Figure(figsize=(5, 5 * arr.shape[1] * sy / max(arr.shape[2] * sx, 1e-6)), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.imshow(arr[z], cmap="gray", vmin=lo, vmax=hi, aspect=sy / sx, interpolation="nearest")
        for mask, colour in ((seg.cord, "lime"), (seg.lesion, "red")):
            if mask is not None and mask[z].any():
                ax.contour(mask[z], levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"slice {z + 1}/{arr.shape[0]}", fontsize=9)
        ax.axis("off")
        path = out_dir / f"preview_z{z + 1:03d}.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


def table_lines(reports: list[dict[str, Any]]) -> list[str]:
    """The summary table: one line per series (status, labels, lesions, time, reason), unescaped."""
    head = f"{'series':<40} {'status':<10} {'anatomy':<8} {'view':<9} {'seq':<8} {'lesions':>7} {'time s':>7}  reason"
    lines = [head, "-" * len(head)]
    for r in reports:
        rt = r.get("routing", {})
        lab = {h: (rt.get(h) or {}).get("label") or "-" for h in ("anatomy", "view", "sequence")}
        les = r.get("measurements", {}).get("lesion_count")
        total = sum(r.get("timings", {}).values())
        lines.append(f"{r['name'][:40]:<40} {r['status']:<10} {lab['anatomy']:<8} {lab['view']:<9} "
                     f"{lab['sequence']:<8} {'-' if les is None else les:>7} {total:>7.1f}  {r.get('reason') or ''}")
    done = sum(r["status"] == "done" for r in reports)
    routed = sum(r["status"] == "routed-out" for r in reports)
    failed = sum(r["status"] == "failed" for r in reports)
    lines.append(f"{len(reports)} series: {done} segmented, {routed} routed out, {failed} failed")
    return lines
