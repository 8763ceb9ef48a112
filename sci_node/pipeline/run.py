"""The inference pipeline: series -> volume -> routing -> segmentation -> measurements -> SEG + SR.

The node's worker and ``sci-node infer`` both call :meth:`Pipeline.run_dicom`; ``sci-node
infer`` also calls :meth:`Pipeline.run_nifti` for NIfTI inputs (masks only: a SEG/SR needs
DICOM source instances to reference). One structlog summary line per series.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import SimpleITK as sitk
import structlog

from sci_node import routing
from sci_node.config import RoutingRules
from sci_node.errors import InvalidDatasetError, InvalidSeriesError
from sci_node.imaging import levels, measure
from sci_node.models.predict_cls import decided_by_header_rule, explaining
from sci_node.pipeline.series import MAX_MISSING_FRACTION, SeriesVolume, read_series
from sci_node.routing import contrast_rules

log = structlog.get_logger("sci_node.pipeline")

SEG_NAME, SR_NAME = "seg.dcm", "sr.dcm"
CORD_NIFTI, LESION_NIFTI, LEVELS_NIFTI = "cord.nii.gz", "lesion.nii.gz", "levels.nii.gz"


class _Classifier(Protocol):
    def predict_explained(self, image: sitk.Image, evidence: Any
                          ) -> tuple[dict[str, dict[str, float]], dict[str, str]]: ...


class _Segmenter(Protocol):
    def predict(self, image: sitk.Image, roi: np.ndarray | None = None) -> np.ndarray: ...
    def predict_with_probability(self, image: sitk.Image, roi: np.ndarray | None = None
                                 ) -> tuple[np.ndarray, np.ndarray]: ...


class ModelSetLike(Protocol):
    """What the pipeline needs of :class:`sci_node.models.registry.ModelSet`."""

    @property
    def anatomy(self) -> _Classifier: ...
    @property
    def region_view(self) -> _Classifier: ...
    @property
    def sequence(self) -> _Classifier: ...
    @property
    def cord(self) -> _Segmenter: ...
    @property
    def lesion(self) -> _Segmenter: ...
    @property
    def versions(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class Segmented:
    """The image and its masks, ``(Z, Y, X)`` uint8 on the image grid (lesion None if not run)."""

    image: sitk.Image
    cord: np.ndarray
    lesion: np.ndarray | None


@dataclass(frozen=True)
class PipelineResult:
    """Outcome of one series (see docs/architecture.md, "Pipeline contract").

    ``segmented`` carries the image and masks for callers that render previews (batch); it
    is None when the series was routed out. ``notes`` are warnings the SEG/SR descriptions also
    carry: missing slices, an incomplete transfer, lesions not assessed (:func:`lesion_note`).
    """

    status: str  # "done" | "routed-out"
    reason: str | None
    routing: dict[str, Any]
    outputs: tuple[Path, ...]
    model_versions: dict[str, str]
    timings: dict[str, float]
    summary: dict[str, Any]
    masks: tuple[Path, ...] = ()
    segmented: Segmented | None = field(default=None, repr=False, compare=False)
    notes: tuple[str, ...] = ()


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class _Clock:
    """Per-stage wall time (s) and peak RSS so far (MiB)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._t, 4)
        self.peak_mb[stage] = round(_peak_rss_mb(), 1)
        self._t = now


class Pipeline:
    """Routing + segmentation + DICOM writing on one set of models.

    Parameters
    ----------
    models
        A :class:`sci_node.models.registry.ModelSet` (five models, ``versions``).
    rules
        ``cfg.routing``.
    device
        ``"cpu"`` or ``"cuda"`` (the models were loaded on it; recorded in the log).
    max_missing_fraction
        ``cfg.max_missing_fraction``: a DICOM series lacking more of its slice grid is refused.
    """

    def __init__(self, models: ModelSetLike, rules: RoutingRules, device: str = "cpu",
                 max_missing_fraction: float = MAX_MISSING_FRACTION) -> None:
        self.models = models
        self.rules = rules
        self.device = device
        self.max_missing_fraction = max_missing_fraction
        self.versions = {str(k): str(v) for k, v in dict(models.versions).items()}

    # -- public API ---------------------------------------------------------------------

    def run_dicom(self, files: Sequence[Path], out_dir: Path, notes: Sequence[str] = ()) -> PipelineResult:
        """Process the DICOM files of one series; write ``seg.dcm``/``sr.dcm`` into ``out_dir``.

        Slices missing from the series are inferred on (interpolated, see
        :mod:`sci_node.pipeline.series`) and get no SEG frame; they are listed in the summary
        (``missing_slices``) and noted in the result and the SEG/SR descriptions, after the
        caller's ``notes`` (e.g. ``"incomplete transfer"``).

        Raises
        ------
        InvalidSeriesError
            The files do not form one regular volume (reason in the message).
        ModelError
            A model fails.
        """
        from sci_node.routing.evidence import HeaderEvidence

        clock = _Clock()
        vol = read_series(files, self.max_missing_fraction)
        evidence = HeaderEvidence.from_dicom(vol.first)
        clock.lap("load")
        series_uid = str(vol.first.get("SeriesInstanceUID", ""))
        all_notes = (*notes, *missing_notes(vol))
        result = self._process(vol.image, evidence, Path(out_dir), clock, vol, all_notes)
        self._log(result, series_uid=series_uid, instances=len(files), missing_slices=len(vol.missing))
        return result

    def run_nifti(self, path: Path, out_dir: Path) -> PipelineResult:
        """Process one NIfTI volume (BIDS JSON sidecar used as header evidence when present).

        Writes ``cord.nii.gz`` (and ``lesion.nii.gz``) on the input grid; no SEG/SR.
        """
        from sci_node.routing.evidence import HeaderEvidence

        clock = _Clock()
        image = read_nifti(Path(path))
        sidecar = _sidecar(Path(path))
        evidence = HeaderEvidence.from_bids_sidecar(sidecar) if sidecar is not None else None
        clock.lap("load")
        result = self._process(image, evidence, Path(out_dir), clock, None)
        self._log(result, source=str(path))
        return result

    # -- stages -------------------------------------------------------------------------

    def _process(self, image: sitk.Image, evidence: Any, out_dir: Path, clock: _Clock,
                 vol: SeriesVolume | None, notes: Sequence[str] = ()) -> PipelineResult:
        how: dict[str, str] = {}
        decision = routing.route(explaining(lambda name: getattr(self.models, name), image, evidence, how),
                                 self.rules, evidence=evidence, n_slices=routing.slice_count(image.GetSize()))
        clock.lap("classify")
        gaps = {"missing_slices": list(vol.missing)} if vol is not None and vol.missing else {}
        if decision.routed_out:
            return self._result("routed-out", decision.reason, decision, clock, gaps, notes=tuple(notes))
        cord = np.asarray(self.models.cord.predict(image), dtype=np.uint8)
        decision, contrast = self._recheck(decision, image, cord, how.get("sequence", "network"))
        lesion, lesion_prob = None, None
        if decision.segment_lesions:
            lesion, lesion_prob = self.models.lesion.predict_with_probability(image, roi=cord)
            lesion = np.asarray(lesion, dtype=np.uint8) * (cord.max() > 0)
        clock.lap("segment")
        m = measure.index_to_lps(image.GetOrigin(), image.GetSpacing()[:3], image.GetDirection())
        vertebral = levels.label_image(image, cord, m)  # vertebral levels of the cord (sci_node.imaging.levels)
        summary = {**measure.summarize(cord, lesion, m, lesion_prob, vertebral), **gaps, **contrast}
        if not cord.any():
            clock.lap("write")
            return self._result("routed-out", "the cord model found no spinal cord in this series",
                                decision, clock, summary, notes=tuple(notes))
        if not decision.segment_lesions:  # the SEG/SR say so, and the SR carries no lesion count
            notes = (*notes, lesion_note(decision, self.rules))
        out_dir.mkdir(parents=True, exist_ok=True)
        masks = write_masks(image, cord, lesion, out_dir, vertebral.level_map if vertebral.known else None)
        outputs = self._write_dicom(vol, cord, lesion, summary, out_dir, notes) if vol is not None else ()
        clock.lap("write")
        return self._result("done", None, decision, clock, summary, outputs=outputs, masks=masks,
                            segmented=Segmented(image, cord, lesion), notes=tuple(notes))

    def _recheck(self, decision: routing.RoutingDecision, image: sitk.Image, cord: np.ndarray,
                 how: str) -> tuple[routing.RoutingDecision, dict[str, float]]:
        """The sequence checked against the CSF/cord contrast around ``cord`` (:func:`routing.recheck_sequence`).

        Returns the (possibly corrected) decision and ``{"csf_to_cord": ratio}`` for the summary
        (empty when the check is off, a header rule decided the sequence, or nothing was measured).
        """
        header_decided = decided_by_header_rule(how)
        if not cord.any() or not routing.contrast_check_applies(decision, self.rules, header_decided):
            return decision, {}
        arr = sitk.GetArrayFromImage(image)
        if arr.ndim == cord.ndim + 1:  # 4-D: the first volume, as the classifiers read it
            arr = arr[0]
        if arr.shape != cord.shape:
            return decision, {}
        measured = contrast_rules.cord_contrast(arr, cord, image.GetSpacing()[:3][::-1])
        checked = routing.recheck_sequence(decision, contrast_rules.sequence_from_contrast(measured), self.rules,
                                           header_decided)
        return checked, ({"csf_to_cord": round(measured.csf_to_cord, 3)} if measured is not None else {})

    def _write_dicom(self, vol: SeriesVolume, cord: np.ndarray, lesion: np.ndarray | None,
                     summary: dict[str, Any], out_dir: Path, notes: Sequence[str] = ()) -> tuple[Path, ...]:
        """Write the SEG and SR; ``summary`` gains ``key_images`` (where a viewer opens:
        :mod:`sci_node.pipeline.key_slices`)."""
        from sci_node.pipeline.key_slices import key_images, viewer_record
        from sci_node.pipeline.seg_writer import build_seg, levels_covered
        from sci_node.pipeline.sr_writer import build_sr

        seg = build_seg(vol, cord, lesion, self.versions, notes,
                        where=levels_covered(summary.get("vertebral_levels") or []))
        seg_path = out_dir / SEG_NAME
        seg.save_as(seg_path, enforce_file_format=True)
        keys = key_images(vol, cord, lesion, summary.get("lesions", []))
        sr = build_sr(seg, list(vol.datasets), summary, self.versions, notes, key_images=keys)
        sr_path = out_dir / SR_NAME
        sr.save_as(sr_path, enforce_file_format=True)
        summary["key_images"] = viewer_record(keys, str(sr.SeriesInstanceUID))
        return (seg_path, sr_path)

    def _result(self, status: str, reason: str | None, decision: routing.RoutingDecision, clock: _Clock,
                summary: dict[str, Any], **extra: Any) -> PipelineResult:
        summary = dict(summary)
        summary["peak_rss_mb"] = dict(clock.peak_mb)
        return PipelineResult(status=status, reason=reason, routing=decision.as_dict(),
                              outputs=tuple(extra.pop("outputs", ())), model_versions=dict(self.versions),
                              timings=dict(clock.timings), summary=summary, **extra)

    def _log(self, result: PipelineResult, **context: Any) -> None:
        log.info("series.processed", status=result.status, reason=result.reason,
                 rule=result.routing.get("rule"),
                 labels={h: v.get("label") for h, v in result.routing.items() if isinstance(v, dict)},
                 lesion_count=result.summary.get("lesion_count"), timings=result.timings,
                 model_versions=result.model_versions, device=self.device, **context)


def lesion_note(decision: routing.RoutingDecision, rules: RoutingRules) -> str:
    """Why a segmented series has no lesion result: ``"lesions not assessed: T1w"`` (a class the lesion
    model does not read), ``"... sequence unsure"`` (decided for the cord by action) or ``"... lesions off"``."""
    label = decision.heads["sequence"].label if "sequence" in decision.heads else None
    if not rules.lesion_sequences:
        why = "lesions off"
    elif label not in rules.lesion_sequences:
        why = str(label)
    else:
        why = "sequence unsure"
    return f"lesions not assessed: {why}"


def missing_notes(vol: SeriesVolume) -> tuple[str, ...]:
    """``("1 slice missing",)`` when the series lacks slices of its grid, else ``()``."""
    n = len(vol.missing)
    return (f"{n} slice{'s' if n > 1 else ''} missing",) if n else ()


# -- I/O adapters ---------------------------------------------------------------------------

def read_nifti(path: Path) -> sitk.Image:
    """A NIfTI file as a float32 3-D ``SimpleITK.Image`` (LPS); 4-D inputs keep their first volume.

    Raises
    ------
    InvalidDatasetError
        Unreadable file.
    InvalidSeriesError
        Not 3-D or 4-D.
    """
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InvalidDatasetError(f"{str(path)!r} is not a readable NIfTI file: {exc}") from None
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        size[3] = 0
        img = sitk.Extract(img, size, [0, 0, 0, 0])
    if img.GetDimension() != 3:
        raise InvalidSeriesError(f"{str(path)!r} has {img.GetDimension()} dimensions; expected 3 (or 4)")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidSeriesError(f"{str(path)!r} has {img.GetNumberOfComponentsPerPixel()} components per voxel")
    return sitk.Cast(img, sitk.sitkFloat32)


def _sidecar(path: Path) -> dict[str, Any] | None:
    import json

    name = path.name.removesuffix(".gz").removesuffix(".nii")
    js = path.with_name(name + ".json")
    if not js.is_file():
        return None
    try:
        data = json.loads(js.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidDatasetError(f"sidecar {str(js)!r} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else None


def write_masks(image: sitk.Image, cord: np.ndarray, lesion: np.ndarray | None, out_dir: Path,
                level_map: np.ndarray | None = None) -> tuple[Path, ...]:
    """Write ``(Z, Y, X)`` uint8 masks (and the vertebral level map, ``levels.nii.gz``: SCT numbering, 0 outside
    the cord) as NIfTI on ``image``'s grid; return their paths."""
    paths = []
    for name, arr in ((CORD_NIFTI, cord), (LESION_NIFTI, lesion), (LEVELS_NIFTI, level_map)):
        if arr is None:
            continue
        out = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.uint8))
        out.CopyInformation(image)
        path = out_dir / name
        sitk.WriteImage(out, str(path), useCompression=True)
        paths.append(path)
    return tuple(paths)
