"""Training samples of the routing classifiers: real volumes, PAM50 synthetic spines, phantoms.

Every sample is what the node's classifier sees — :func:`sci_node.routing.cls_features.series_inputs`
of a ``SimpleITK.Image`` plus a :class:`HeaderEvidence` — together with its labels
(anatomy, region, view, sequence; ``-1`` = unknown/not applicable) and its **group**
(the person it comes from: cross-validation folds hold out whole groups).

Labels come from the source catalogue (:data:`DEFAULT_SOURCES`: which file is which
anatomy/region/contrast, written from the data README), never from what the classifier
sees. The view label is the plane of the stored slices (:func:`sci_node.routing.cls_features.view_of_image`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from sci_node.errors import DataError
from sci_node.routing.cls_features import view_of_image
from sci_node.routing.evidence import HeaderEvidence

ANATOMY = ("spine", "brain", "abdomen", "other")
REGION = ("cervical", "thoracic", "lumbar")
VIEW = ("sagittal", "axial", "coronal")
SEQUENCE = ("T1w", "T2w", "T2starw", "other")
TASKS = ("anatomy", "region", "view", "sequence")


@dataclass(frozen=True)
class Source:
    """One catalogue entry: a file (relative to its root) and what it is.

    ``root`` is ``"data"`` (the ``--data`` folder), ``"nibabel"`` (nibabel's test data) or
    ``"pydicom"`` (pydicom's test files). ``region`` ``"levels"`` = from the PAM50 level map.
    ``sequence`` ``None`` = not known (e.g. the AMU 7 T image, whose contrast upstream does
    not state): the sample trains and scores the other heads only. ``n_aug`` overrides the
    config's number of random crops for this file (e.g. the 19 near-identical series of one
    person in ``nonspine-mr``). A path ending in ``.mosaic`` means the first DICOM file of
    that folder, a Siemens MOSAIC un-tiled into its slices.
    """

    root: str
    path: str
    group: str
    anatomy: str
    sequence: str | None
    region: str | None = None
    sidecar: bool = False
    n_aug: int | None = None


_D = "data"
_GM = (("9418", "gm-9418"), ("9604", "gm-9604"), ("9669", "gm-9669"), ("9709Ses1", "gm-9709"),
       ("9709Ses2", "gm-9709"), ("10062Ses1", "gm-10062"), ("10062Ses2", "gm-10062"))
_DCM_QA = tuple(f"nonspine-mr/dcm_qa/{o}/{o}{k}" for o in ("ax", "cor", "sag")
                for k in ("asc35", "asc36", "desc35", "desc36", "int35", "int36"))
#: Groups = persons (data README, "Subject groups for splitting"). Templates (PAM50,
#: MNI-Poly-AMU) are population averages: kept on the training side (``[validation]
#: train_only_groups``), never scored.
DEFAULT_SOURCES: tuple[Source, ...] = tuple(
    [Source(_D, f"ivadomed-data-testing/sub-{s}/anat/sub-{s}_{c}.nii.gz", g, "spine", q, "cervical", True)
     for s, g in (("unf01", "p-unf01"), ("unf02", "p-unf02"), ("unf03", "p-unf03"))
     for c, q in (("T1w", "T1w"), ("T2w", "T2w"), ("T2star", "T2starw"))]
    + [Source(_D, f"sct-tutorial-data/sub-{s}/anat/sub-{s}_acq-{m}_MTS.nii.gz", g, "spine", "other", "cervical", True)
       for s, g in (("01", "p-unf01"), ("03", "p-unf03"), ("05", "p-sub05")) for m in ("MToff", "MTon")]
    + [Source(_D, f"sct-tutorial-data/sub-single/anat/sub-single_acq-{m}_MTS.nii.gz", "p-single", "spine", "other",
              "cervical") for m in ("MToff", "MTon")]
    + [Source(_D, "sct-tutorial-data/sub-single/dwi/sub-single_dwi.nii.gz", "p-single", "spine", "other", "cervical"),
       # README: sub-lumbar "may be one session" with sub-single -> same group, to be safe.
       Source(_D, "sct-tutorial-data/sub-lumbar/anat/sub-lumbar_T2w.nii.gz", "p-single", "spine", "T2w", "lumbar"),
       Source(_D, "sct-tutorial-data/sub-ms/anat/sub-ms_T2w.nii.gz", "p-ms", "spine", "T2w", "cervical"),
       Source(_D, "sct-testing-data/sub-PAM50small/anat/sub-PAM50small_T2w.nii.gz", "PAM50", "spine", "T2w", "levels")]
    # sct-history: full field-of-view sagittal T2w (brain stem to upper thoracic; the centre is cervical)
    + [Source(_D, f"sct-history/sub-errsm{n}/anat/sub-errsm{n}_T2w.nii.gz", f"errsm{n}", "spine", "T2w", "cervical")
       for n in ("11", "18", "20", "21", "22", "23")]
    + [Source(_D, "sct-history/sub-errsm18/anat/sub-errsm18_T2star.nii.gz", "errsm18", "spine", "T2starw", "cervical")]
    + [Source(_D, f"sct-history/sub-errsm23/anat/sub-errsm23_acq-{m}_MTS.nii.gz", "errsm23", "spine", "other",
              "cervical") for m in ("MToff", "MTon")]
    + [Source(_D, f"gm-challenge/sub-{s}/anat/sub-{s}_run-{r}_T2starw.nii.gz", g, "spine", "T2starw", "cervical", True,
              n_aug=8) for s, g in _GM for r in (1, 2)]
    + [Source(_D, "amu7t/sub-amu7t/anat/sub-amu7t_acq-7T_image.nii.gz", "amu7t", "spine", None, "cervical"),
       Source(_D, "templates/sub-MNIPolyAMUds/anat/sub-MNIPolyAMUds_T2w.nii.gz", "tpl-MNIPolyAMU", "spine", "T2w"),
       Source(_D, "fmri-leipzig/sub-ZS001/func/sub-ZS001_task-rest_desc-mocomean_bold.nii.gz", "fmri-ZS001", "spine",
              "other", "cervical", True)]
    + [Source(_D, f"{d}.mosaic", "dcmqa-crlab", "brain", "other", n_aug=3) for d in _DCM_QA]
    + [Source(_D, "nonspine/sub-spleen2/ct/sub-spleen2_ct.nii.gz", "ct-spleen2", "abdomen", "other"),
       Source("nibabel", "anatomical.nii", "nib-spm", "brain", "T1w"),
       Source("nibabel", "functional.nii", "nib-spm", "brain", "other"),
       Source("nibabel", "example4d.nii.gz", "nib-4d", "brain", "other"),
       Source("nibabel", "phantom_EPI_asc_CLEAR_2_1.PAR", "nib-phantom", "other", "other"),
       Source("pydicom", "MR_small.dcm", "pyd-mrsmall", "brain", "T2w"),
       Source("pydicom", "examples_overlay.dcm", "pyd-abdomen", "abdomen", "T1w")]
)
BIDS_SEQUENCE = {"T1w": "T1w", "T2w": "T2w", "T2star": "T2starw"}


@dataclass
class SampleSet:
    """Stacked samples. ``thumbs (N, 3, S, S)``, ``features (N, F)``, ``labels[task] (N,)`` int64 (-1 = none)."""

    thumbs: np.ndarray
    features: np.ndarray
    labels: dict[str, np.ndarray]
    groups: np.ndarray  # (N,) str
    real: np.ndarray  # (N,) bool: from a real acquisition (not synthetic)
    stored: np.ndarray  # (N,) bool: the volume as stored (no crop / augmentation)
    rule: np.ndarray  # (N,) int: index in SEQUENCE of the header rule's class, -1 = no rule fired
    meta: dict[str, Any] = field(default_factory=dict)
    #: (N,) bool: the sample came with acquisition parameters; set when the header features are
    #: blanked for a model that does not use them (else read from the features)
    header: np.ndarray | None = None

    def subset(self, idx: np.ndarray) -> "SampleSet":
        return SampleSet(self.thumbs[idx], self.features[idx], {k: v[idx] for k, v in self.labels.items()},
                         self.groups[idx], self.real[idx], self.stored[idx], self.rule[idx], self.meta,
                         None if self.header is None else self.header[idx])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, thumbs=self.thumbs, features=self.features, groups=self.groups, real=self.real,
                            stored=self.stored, rule=self.rule,
                            **{f"label_{k}": v for k, v in self.labels.items()})  # type: ignore[arg-type]

    @classmethod
    def concat(cls, a: "SampleSet", b: "SampleSet", meta: dict[str, Any]) -> "SampleSet":
        """``a`` followed by ``b`` (same tasks; ``header`` masks are dropped: set by the model's view)."""
        return cls(np.concatenate([a.thumbs, b.thumbs]), np.concatenate([a.features, b.features]),
                   {k: np.concatenate([a.labels[k], b.labels[k]]) for k in TASKS},
                   np.concatenate([a.groups, b.groups]), np.concatenate([a.real, b.real]),
                   np.concatenate([a.stored, b.stored]), np.concatenate([a.rule, b.rule]), meta)

    @classmethod
    def load(cls, path: Path, meta: dict[str, Any]) -> "SampleSet":
        z = np.load(path)
        return cls(z["thumbs"], z["features"], {k: z[f"label_{k}"] for k in TASKS}, z["groups"], z["real"],
                   z["stored"], z["rule"], meta)


# -- loading ------------------------------------------------------------------------------

def root_dir(root: str, data: Path) -> Path:
    """Folder of a catalogue root."""
    if root == "data":
        return data
    if root == "nibabel":
        import nibabel.testing

        return Path(str(nibabel.testing.data_path))
    if root == "pydicom":
        from pydicom.data import DATA_ROOT

        return Path(str(DATA_ROOT)) / "test_files"
    raise DataError(f"unknown source root {root!r}")


def _nib_to_sitk(path: Path) -> sitk.Image:
    """Any nibabel-readable image (PAR/REC, MINC ...) as a 3-D LPS SimpleITK image (first volume)."""
    import nibabel as nib

    img: Any = nib.load(str(path))
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    while arr.ndim > 3:
        arr = arr[..., 0]
    aff = np.asarray(img.affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0]) @ aff[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    out.SetSpacing([float(s) for s in spacing])
    out.SetDirection((lps / spacing).flatten().tolist())
    out.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ aff[:3, 3]).tolist())
    return out


def load_source(src: Source, data: Path) -> tuple[sitk.Image, HeaderEvidence | None, Path]:
    """Image, header evidence (sidecar / DICOM header; ``None`` when there is none) and file path."""
    import json

    path = root_dir(src.root, data) / src.path
    if path.suffix == ".mosaic":
        return _mosaic(path.with_suffix(""))
    if not path.is_file():
        raise DataError(f"classifier training source {str(path)!r} does not exist")
    ev: HeaderEvidence | None = None
    if path.suffix == ".dcm":
        import pydicom

        ev = HeaderEvidence.from_dicom(pydicom.dcmread(path, stop_before_pixels=True))
        image = sitk.ReadImage(str(path))
    elif path.suffix.upper() == ".PAR":
        image = _nib_to_sitk(path)
    else:
        image = sitk.ReadImage(str(path))
    if src.sidecar:
        side = path.with_name(path.name.replace(".nii.gz", ".json"))
        if side.is_file():
            ev = HeaderEvidence.from_bids_sidecar(json.loads(side.read_text(encoding="utf-8")))
    return image, stored_grid_evidence(ev, image), path


def source_file(src: Source, data: Path) -> Path:
    """The file a catalogue entry reads (the first DICOM file of a ``.mosaic`` folder)."""
    path = root_dir(src.root, data) / src.path
    if path.suffix == ".mosaic":
        folder = path.with_suffix("")
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        if not files:
            raise DataError(f"classifier training source {str(path.with_suffix(''))!r} holds no DICOM file")
        return files[0]
    return path


def _mosaic(folder: Path) -> tuple[sitk.Image, HeaderEvidence | None, Path]:
    """First file of a Siemens MOSAIC series, un-tiled (nibabel's MosaicWrapper) into a 3-D LPS image."""
    import warnings

    import pydicom

    # absolute: source_file joins the path to a root, and a relative --data folder must not become /-relative
    path = source_file(Source("data", str(folder.resolve()) + ".mosaic", "", "other", None), Path("/"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns that its DICOM readers are experimental
        from nibabel.nicom import dicomwrappers

        wrapper = dicomwrappers.wrapper_from_file(str(path))
        arr = np.asarray(wrapper.get_data(), np.float32)
        aff = np.asarray(wrapper.affine, np.float64)  # array index -> DICOM patient (LPS) mm
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    out.SetSpacing([float(v) for v in spacing])
    out.SetDirection((aff[:3, :3] / spacing).flatten().tolist())
    out.SetOrigin(aff[:3, 3].tolist())
    ev = HeaderEvidence.from_dicom(pydicom.dcmread(path, stop_before_pixels=True))
    return out, stored_grid_evidence(ev, out), path


def stored_grid_evidence(ev: HeaderEvidence | None, image: sitk.Image) -> HeaderEvidence | None:
    """``ev`` without its slice normal when that normal contradicts the stored image's slices.

    A BIDS sidecar describes the acquisition; a NIfTI resliced afterwards keeps it. The
    ivadomed ``sub-unf01`` T1w and T2w sidecars say sagittal (``ImageOrientationPatientDICOM``)
    while their NIfTI volumes are axial crops. In a DICOM series, what the node sees,
    ImageOrientationPatient always describes the stored slices, so training on the
    contradiction would teach a conflict the node never meets.
    """
    if ev is None or ev.view is None or ev.view == view_of_image(image):
        return ev
    return dataclasses.replace(ev, slice_normal=None)




# -- header sampling -------------------------------------------------------------------------

#: Per-sequence protocol families: (ScanningSequence, SequenceVariant, acq, TE ms, TR ms, TI ms, flip deg).
PROTOCOLS: dict[str, tuple[tuple[Any, ...], ...]] = {
    "T1w": (("SE", "SK_SP", "2D", (8, 20), (400, 800), None, (70, 150)),
            ("GR_IR", "SK_SP_MP", "3D", (2, 5), (1500, 2500), (800, 1100), (7, 12)),
            ("GR", "SP", "2D", (2, 6), (150, 500), None, (60, 90)),
            ("GR", "SK_SP_SS", "3D", (1.5, 3), (4, 8), None, (9, 15))),
    "T2w": (("SE", "SK_SP_OSP", "2D", (80, 130), (2500, 6000), None, (90, 180)),
            ("SE", "SK_SP_OSP", "3D", (90, 140), (1200, 2000), None, (100, 150))),
    "T2starw": (("GR", "SP", "2D", (10, 30), (300, 900), None, (20, 40)),
                ("GR", "SK_SP", "3D", (12, 25), (30, 60), None, (8, 15))),
    "other": (("GR", "MTC_SP", "3D", (2, 5), (25, 45), None, (5, 12)),      # MT-on
              ("GR", "SP", "3D", (2, 5), (25, 45), None, (5, 12)),          # MT-off / PD GRE
              ("EP", "SK_SP", "2D", (55, 100), (3000, 9000), None, (90, 90)),  # DWI
              ("EP", "SK", "2D", (25, 40), (1500, 3000), None, (60, 90)),      # BOLD EPI (GR-EPI)
              ("IR", "SK_SP", "2D", (30, 80), (3000, 6000), (130, 250), (90, 150)),   # STIR
              ("SE_IR", "SK_SP_OSP", "2D", (80, 130), (7000, 10000), (2000, 2800), (90, 150)),  # FLAIR
              ("SE", "SK_SP", "2D", (15, 40), (2000, 4000), None, (90, 150))),  # PD
}


def sample_header(seq: str, rng: np.random.Generator) -> HeaderEvidence:
    """A realistic random header of sequence class ``seq`` (no free text, no slice normal)."""
    fams = PROTOCOLS[seq]
    scan, var, acq, te, tr, ti, flip = fams[int(rng.integers(len(fams)))]

    def u(r: tuple[float, float]) -> float:
        return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1]))))

    return HeaderEvidence(echo_time_ms=u(te), repetition_time_ms=u(tr), inversion_time_ms=u(ti) if ti else None,
                          flip_angle_deg=float(rng.uniform(*flip)), scanning_sequence=tuple(scan.split("_")),
                          sequence_variant=tuple(var.split("_")), mr_acquisition_type=acq)


# -- augmentation of real volumes -------------------------------------------------------------

def random_crop(image: sitk.Image, rng: np.random.Generator, min_frac: float = 0.4) -> sitk.Image:
    """A random sub-box of a 3-D image (each axis keeps ``>= min_frac`` of its voxels, at least 1)."""
    size = list(image.GetSize())
    new = [max(1, int(round(s * rng.uniform(min_frac, 1.0)))) for s in size]
    start = [int(rng.integers(0, s - n + 1)) for s, n in zip(size, new)]
    return sitk.RegionOfInterest(image, new, start)


def intensity_aug(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Random gamma on the robust range, multiplicative bias ramp and Gaussian noise (float32)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    lo, hi = np.percentile(arr[:: max(1, arr.size // 100_000)], [1, 99]) if arr.size else (0.0, 1.0)
    span = max(float(hi - lo), 1e-3)
    x = np.clip((arr - lo) / span, 0, None) ** rng.uniform(0.7, 1.4)
    ramp = np.linspace(1 - rng.uniform(0, 0.3), 1 + rng.uniform(0, 0.3), arr.shape[int(rng.integers(arr.ndim))])
    shape = [1] * arr.ndim
    shape[int(np.argmax([s == ramp.size for s in arr.shape]))] = ramp.size
    x = x * ramp.reshape(shape) + rng.normal(0, rng.uniform(0, 0.04), arr.shape)
    out = sitk.GetImageFromArray((x * span + lo).astype(np.float32))
    out.CopyInformation(image)
    return out


def pam50_region(levels_img: sitk.Image, image: sitk.Image) -> int:
    """Region (index in :data:`REGION`) of the centre of ``image`` from a vertebral-level map (SCT numbering)."""
    size = image.GetSize()
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size])
    lev = sitk.GetArrayViewFromImage(levels_img)
    idx = levels_img.TransformPhysicalPointToIndex(centre)
    z = int(np.clip(idx[2], 0, lev.shape[0] - 1))
    zs = np.nonzero(lev.reshape(lev.shape[0], -1).max(1) > 0)[0]
    zz = zs[np.argmin(np.abs(zs - z))]
    vals = lev[zz][lev[zz] > 0]
    level = int(np.median(vals))
    return level_to_region(level)


def level_to_region(level: int) -> int:
    """SCT vertebral level (1-7 C, 8-19 T, >= 20 L) -> index in :data:`REGION`."""
    return 0 if level <= 7 else (1 if level <= 19 else 2)


def labels_of(src: Source, image: sitk.Image, region: int, ev: HeaderEvidence | None) -> dict[str, int]:
    """Label indices of one sample."""
    spine = src.anatomy == "spine"
    return {"anatomy": ANATOMY.index(src.anatomy), "region": region if spine else -1,
            "view": VIEW.index(view_of_image(image)),
            "sequence": SEQUENCE.index(src.sequence) if src.sequence else -1}


def has_header(ev: HeaderEvidence | None) -> bool:
    """True when ``ev`` carries acquisition parameters (a sequence code or TE/TR), not only geometry."""
    return ev is not None and bool(ev.scanning_sequence or ev.echo_time_ms or ev.repetition_time_ms)


#: ``SampleSet.stored`` values: a random crop, the stored volume with its header as available,
#: the stored volume with its header removed (only for volumes that have one).
CROP, STORED, STORED_NO_HEADER = 0, 1, 2


def real_samples(src: Source, data: Path, n_aug: int, rng: np.random.Generator,
                 levels: sitk.Image | None) -> Iterator[tuple[sitk.Image, HeaderEvidence | None, dict[str, int], int]]:
    """The stored volume (with its header, and again without it), then random crops.

    Crops get intensity augmentation and header augmentation (the true header kept, dropped
    (35 %) or, for volumes without one, replaced by a header sampled from its class's
    protocol ranges). The last item of each tuple is :data:`CROP`, :data:`STORED` or
    :data:`STORED_NO_HEADER`.
    """
    from sci_node.routing.cls_features import scalar_volume

    image, ev, _ = load_source(src, data)
    vol, _ = scalar_volume(image)
    multi = image.GetDimension() == 4
    n_aug = n_aug if src.n_aug is None else int(src.n_aug)
    variants = [(STORED, ev)] + ([(STORED_NO_HEADER, None)] if has_header(ev) else [])
    variants += [(CROP, ev)] * n_aug
    for kind, hdr in variants:
        img = vol if kind != CROP else intensity_aug(random_crop(vol, rng), rng)
        if multi and kind == CROP and rng.random() < 0.7:
            img = image  # keep the 4-D evidence (multi-volume flag) in most augmentations
        if src.region == "levels":
            if levels is None:
                raise DataError(f"{src.path}: region from levels needs the PAM50small level map")
            region = pam50_region(levels, img)
        else:
            region = REGION.index(src.region) if src.region else -1
        if kind == CROP:
            r = rng.random()
            sampled = sample_header(src.sequence, rng) if src.sequence else None
            hdr = None if r < 0.35 else (sampled if (not has_header(ev) or r < 0.55) else ev)
        yield img, hdr, labels_of(src, img, region, hdr), kind
