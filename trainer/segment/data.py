"""Training datasets: BIDS-like folders and DICOM folders → labelled cases.

BIDS-like layout (one dataset, or a folder holding several datasets)::

    <ds>/sub-<id>/anat/sub-<id>_<contrast>.nii.gz
    <ds>/derivatives/labels/sub-<id>/anat/sub-<id>_<contrast>_<mask_suffix>.nii.gz

DICOM layout (one case per sub-folder)::

    <root>/<case>/dicom/...            one series, any file names
    <root>/<case>/<mask_suffix>.nii.gz mask on the series' grid

Every image must have its mask, except those listed in ``unlabelled`` (the shared data has
unlabelled images on purpose) or when ``missing_mask="skip"``; masks must lie on their image's grid (size, spacing,
origin, direction within ``tol``). Violations raise :class:`DataError` naming the file.
"""
from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import structlog

from sci_node.errors import DataError

log = structlog.get_logger(__name__)
NII = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One labelled image.

    Attributes
    ----------
    subject : str
        ``sub-<id>`` (or the DICOM case folder name).
    group : str
        Split unit: subjects that are the same person share a group.
    contrast : str
        File-name contrast entity (e.g. ``T2w``, ``acq-MTon_MTS``).
    image : Path
        NIfTI file or DICOM series folder.
    mask : Path | None
        Reference mask file.
    """

    subject: str
    group: str
    contrast: str
    image: Path
    mask: Path | None = None
    dataset: str = ""

    @property
    def key(self) -> str:
        return f"{self.subject}_{self.contrast}"


@dataclass
class DataSpec:
    """How to collect cases (the ``[data]`` table of a training config)."""

    mask_suffix: str = "seg-manual"
    missing_mask: str = "error"  # "error" | "skip"
    unlabelled: Sequence[str] = ()  # subjects or image stems known to have no mask: skipped, not an error
    exclude: Sequence[str] = ()  # dataset folder names or subject ids to leave out
    same_person: Sequence[Sequence[str]] = field(default_factory=list)
    tol: float = 1e-3
    #: image stem -> stem whose mask it shares (same grid, e.g. an MT-off/MT-on pair)
    mask_from: dict[str, str] = field(default_factory=dict)
    #: groups that are never held out (population templates: not persons)
    train_only: Sequence[str] = ()


def is_unlabelled(subject: str, stem: str, spec: DataSpec) -> bool:
    """True when ``subject`` or ``stem`` matches an ``unlabelled`` entry (exact or fnmatch pattern)."""
    return any(fnmatch.fnmatchcase(subject, pat) or fnmatch.fnmatchcase(stem, pat) for pat in spec.unlabelled)


def _stem(p: Path) -> str:
    name = p.name
    for ext in NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return p.stem


def _group_of(subject: str, spec: DataSpec) -> str:
    for grp in spec.same_person:
        if subject in grp:
            return str(grp[0])
    return subject


BIDS_KINDS = ("anat", "func")  # image folders read (dwi and ct are not segmentation inputs)


def _bids_cases(ds: Path, spec: DataSpec) -> list[Case]:
    cases: list[Case] = []
    images = sorted(p for kind in BIDS_KINDS for p in ds.glob(f"sub-*/{kind}/*.nii*"))
    for img in images:
        subject, kind = img.parts[-3], img.parts[-2]
        if subject in spec.exclude:
            continue
        stem = _stem(img)
        contrast = stem[len(subject) + 1:]
        mask_stem = spec.mask_from.get(stem, stem)
        labels = ds / "derivatives" / "labels" / subject / kind
        mask = next((labels / f"{mask_stem}_{spec.mask_suffix}{ext}" for ext in NII
                     if (labels / f"{mask_stem}_{spec.mask_suffix}{ext}").is_file()), None)
        if mask is None:
            if spec.missing_mask == "skip" or is_unlabelled(subject, stem, spec):
                log.info("dataset.unlabelled_skipped", image=str(img), mask_suffix=spec.mask_suffix)
                continue
            raise DataError(f"image {str(img)!r} has no mask {mask_stem}_{spec.mask_suffix}.nii.gz under "
                            f"{str(labels)!r}")
        cases.append(Case(subject, _group_of(subject, spec), contrast, img, mask, dataset=ds.name))
    return cases


def _has_bids(d: Path) -> bool:
    return any(any(d.glob(f"sub-*/{kind}")) for kind in BIDS_KINDS)


def _dicom_cases(root: Path, spec: DataSpec) -> list[Case]:
    cases: list[Case] = []
    for case_dir in sorted(p for p in root.iterdir() if (p / "dicom").is_dir()):
        if case_dir.name in spec.exclude:
            continue
        mask = next((case_dir / f"{spec.mask_suffix}{e}" for e in NII
                     if (case_dir / f"{spec.mask_suffix}{e}").is_file()), None)
        if mask is None and spec.missing_mask != "skip":
            raise DataError(f"DICOM case {str(case_dir)!r} has no mask {spec.mask_suffix}.nii.gz")
        if mask is not None:
            cases.append(Case(case_dir.name, _group_of(case_dir.name, spec), "dicom", case_dir / "dicom", mask))
    return cases


def discover(root: Path, spec: DataSpec) -> list[Case]:
    """Find all labelled cases under ``root``.

    ``root`` is a BIDS-like dataset, a folder of such datasets, or a folder of DICOM cases.

    Raises
    ------
    DataError
        ``root`` missing or holding no image; an image without its mask (``missing_mask="error"``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    if _has_bids(root):
        datasets: Iterable[Path] = [root]
    else:
        datasets = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name not in spec.exclude and _has_bids(d)]
    cases = [c for ds in datasets for c in _bids_cases(ds, spec)]
    if not datasets:
        cases = _dicom_cases(root, spec)
    if not cases:
        raise DataError(f"data folder {str(root)!r} holds no labelled image "
                        f"(expected sub-*/anat/*.nii.gz with derivatives/labels/..._{spec.mask_suffix}.nii.gz, "
                        f"or <case>/dicom/ + <case>/{spec.mask_suffix}.nii.gz)")
    return cases


def read_image(path: Path) -> sitk.Image:
    """Read a NIfTI file or a DICOM series folder as a 3-D image (LPS)."""
    path = Path(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise DataError(f"DICOM folder {str(path)!r} holds no readable series")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"cannot read image {str(path)!r}: {str(exc).splitlines()[-1] if str(exc) else exc}") from None


def check_geometry(image: sitk.Image, mask: sitk.Image, mask_path: Path, tol: float = 1e-3) -> None:
    """Raise :class:`DataError` naming ``mask_path`` if ``mask`` is not on ``image``'s grid."""
    isz, msz = image.GetSize()[:3], mask.GetSize()[:3]
    if isz != msz:
        raise DataError(f"mask {str(mask_path)!r} has size {msz}, its image has {isz}")
    for what, a, b in (("spacing", image.GetSpacing()[:3], mask.GetSpacing()[:3]),
                       ("origin", image.GetOrigin()[:3], mask.GetOrigin()[:3])):
        if np.max(np.abs(np.subtract(a, b))) > tol:
            raise DataError(f"mask {str(mask_path)!r} {what} {tuple(round(x, 4) for x in b)} differs from "
                            f"its image's {tuple(round(x, 4) for x in a)}")
    di = np.asarray(image.GetDirection()).reshape(image.GetDimension(), -1)[:3, :3]
    dm = np.asarray(mask.GetDirection()).reshape(mask.GetDimension(), -1)[:3, :3]
    if np.max(np.abs(di - dm)) > tol:
        raise DataError(f"mask {str(mask_path)!r} direction differs from its image's "
                        f"(max abs diff {np.max(np.abs(di - dm)):.4f})")


def load_case(case: Case, tol: float = 1e-3, mask_threshold: float = 0.5) -> tuple[sitk.Image, sitk.Image]:
    """Read a case's image and mask (binary uint8: value >= ``mask_threshold``), checking the mask geometry.

    The threshold matters only for partial-volume maps (the MNI-Poly-AMU template's cord map,
    values 0..1 in steps of 0.125); binary 0/1 masks are unchanged by it.
    """
    image = read_image(case.image)
    if case.mask is None:
        raise DataError(f"case {case.key!r} ({str(case.image)!r}) has no mask")
    mask = read_image(case.mask)
    check_geometry(image, mask, case.mask, tol)
    mask = sitk.Cast(sitk.Cast(mask, sitk.sitkFloat32) >= float(mask_threshold), sitk.sitkUInt8)
    if image.GetDimension() == 4:
        raise DataError(f"image {str(case.image)!r} is 4-D; segmentation training needs 3-D images")
    return image, mask


def gm_mask_path(case: Case) -> Path | None:
    """The grey-matter mask beside a case's cord mask (``*_seg-manual`` → ``*_gmseg-manual``), if any."""
    if case.mask is None or "_seg-manual" not in case.mask.name:
        return None
    p = case.mask.with_name(case.mask.name.replace("_seg-manual", "_gmseg-manual"))
    return p if p.is_file() else None


def data_hash(cases: Sequence[Case]) -> str:
    """SHA-256 over the bytes of every image and mask file (sorted by path)."""
    h = hashlib.sha256()
    files: list[Path] = []
    for c in cases:
        for p in (c.image, c.mask):
            if p is None:
                continue
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    for f in sorted(set(files)):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def kfold_groups(cases: Sequence[Case], k: int, train_only: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """Subject-grouped k-fold: ``[(fold_name, held_out_groups), ...]``.

    Groups (persons) are ordered by (dataset folder, group) and dealt round-robin into ``k``
    folds, so each dataset's subjects spread over the folds. Groups in ``train_only``
    (population templates) are never held out. Deterministic: no random draw.
    """
    firsts: dict[str, str] = {}
    for c in cases:
        firsts.setdefault(c.group, c.dataset)
    order = sorted((firsts[g], g) for g in firsts if g not in set(train_only))
    k = max(1, min(int(k), len(order)))
    folds: list[list[str]] = [[] for _ in range(k)]
    for i, (_, g) in enumerate(order):
        folds[i % k].append(g)
    return [(f"fold{i}", sorted(f)) for i, f in enumerate(folds) if f]


def loso_folds(cases: Sequence[Case]) -> list[tuple[str, list[Case], list[Case]]]:
    """Leave-one-group-out splits: ``[(held_out_group, train_cases, val_cases), ...]``."""
    groups = sorted({c.group for c in cases})
    return [(g, [c for c in cases if c.group != g], [c for c in cases if c.group == g]) for g in groups]
