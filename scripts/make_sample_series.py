#!/usr/bin/env python
"""Make the committed sample MR DICOM series from redistributable NIfTI volumes.

Run from the repository root (needs ``../shared/data/spine``, which a user's clone does not
have: the outputs are committed, this script documents and reproduces them)::

    .venv/bin/python scripts/make_sample_series.py [--data ../shared/data/spine]

Outputs (all uncompressed Explicit VR Little Endian MR Image Storage, 16-bit unsigned):

* ``sample/series/``                       demo: sagittal T2w cervical spine, brainstem to upper thoracic
  (sub-errsm22 of the 2014 spinalcordtoolbox test data, MIT; unlabelled, never used for training)
* ``tests/data/series/lumbar_sag_T2w/``    sagittal T2w lumbar spine, conus and cauda equina (sct_tutorial_data,
  MIT): what the models must not mark (no cord below the conus, no lesion); the demo sample until issue #15
* ``tests/data/series/unf01_axial_T2w/``   axial T2w cervical, 16 slices (ivadomed data-testing / spine-generic)
  with ``cord_mask.nii.gz`` (the manual cord mask, unchanged grid)
* ``tests/data/series/pam50_sag_T2w/``     sagittal T2w PAM50 template crop (sct_testing_data, MIT)
  with ``cord_mask.nii.gz``
* ``tests/data/series/brain_axial_T1w/``   non-spine: nibabel's test-data ``anatomical.nii`` (MIT)

Geometry: the NIfTI affine (RAS) is converted to DICOM patient LPS; ImagePositionPatient /
ImageOrientationPatient are exact. Acquisition headers: the source's BIDS sidecar values when it has
one (sub-unf01: spine-generic 3-D T2 SPACE), otherwise typical values for the contrast. Intensities are
rescaled linearly to 0..4095 (12 bits stored), without RescaleSlope (MR Image IOD). UIDs are derived
deterministically from the series name (``pydicom.uid.generate_uid(entropy_srcs=...)``) so re-running gives
identical files.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO = Path(__file__).resolve().parent.parent

#: MR acquisition parameters consistent with each contrast (typical 1.5/3 T protocols).
CONTRASTS = {
    # 3-D variable-flip-angle TSE (SPACE), as in the spine-generic protocol sidecars
    "T2w": dict(ScanningSequence="SE", SequenceVariant=["SK", "SP", "OSP"], ScanOptions="PFP", EchoTime=120.0,
                RepetitionTime=1500.0, FlipAngle=120.0, EchoTrainLength=76, SequenceName="*spcR_100"),
    "T1w": dict(ScanningSequence=["GR", "IR"], SequenceVariant=["SK", "SP", "MP"], ScanOptions="",
                EchoTime=3.0, RepetitionTime=2300.0, FlipAngle=9.0, EchoTrainLength=1,
                InversionTime=900.0, SequenceName="*tfl3d1"),
    "T2starw": dict(ScanningSequence="GR", SequenceVariant="SP", ScanOptions="", EchoTime=20.0,
                    RepetitionTime=600.0, FlipAngle=30.0, EchoTrainLength=1, SequenceName="*fl2d1"),
}

#: Target array axis codes (nibabel RAS letters: direction of increasing index) for
#: (columns, rows, slices) of the DICOM images, so they display in radiological convention.
VIEWS = {
    "sagittal": ("P", "I", "L"),
    "axial": ("L", "P", "S"),
}


@dataclass(frozen=True)
class SeriesSpec:
    """One series to make."""

    name: str
    source: Path
    out_dir: Path
    contrast: str
    view: str
    body_part: str
    description: str
    crop: tuple[slice, slice, slice] | None = None  # in the source NIfTI's voxel axes
    mask: Path | None = None
    series_number: int = 1
    mr_acquisition_type: str = "3D"
    #: source voxel axis to upsample x2 (linear) so the in-plane pixels become square
    upsample_axis: int | None = None


def _reorient(img: nib.Nifti1Image, view: str, crop: tuple[slice, ...] | None,
              upsample_axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return data (cols, rows, slices) and its RAS affine after crop, upsampling, reorientation."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = img.affine.copy()
    if crop is not None:
        start = np.array([s.start or 0 for s in crop] + [1.0])
        data = data[crop]
        affine[:3, 3] = (affine @ start)[:3]
    if upsample_axis is not None:
        data, affine = _upsample2(data, affine, upsample_axis)
    cur = ornt.io_orientation(affine)
    want = ornt.axcodes2ornt(VIEWS[view])
    tr = ornt.ornt_transform(cur, want)
    shape = data.shape
    data = ornt.apply_orientation(data, tr)
    affine = affine @ ornt.inv_ornt_aff(tr, shape)
    return data, affine


def _upsample2(data: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear x2 upsampling along ``axis``: samples at k/2, k = 0 .. 2(n-1); origin unchanged."""
    moved = np.moveaxis(data, axis, 0)
    out = np.empty((2 * moved.shape[0] - 1, *moved.shape[1:]), dtype=np.float32)
    out[0::2] = moved
    out[1::2] = 0.5 * (moved[:-1] + moved[1:])
    aff = affine.copy()
    aff[:3, axis] /= 2.0
    return np.moveaxis(out, 0, axis), aff


def _to_uint12(data: np.ndarray) -> np.ndarray:
    lo = min(0.0, float(np.percentile(data, 0.0)))
    hi = float(np.percentile(data, 99.95))
    out = np.clip((data - lo) / max(hi - lo, 1e-6) * 4095.0, 0, 4095)
    return np.rint(out).astype(np.uint16)


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["sci-node-sample", *parts])


def _base_dataset(spec: SeriesSpec, study_uid: str, patient: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20200101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "sci-node sample (converted from NIfTI)"
    ds.InstitutionName = "Anonymous"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI spine (sample)" if spine(spec) else "MRI brain (sample)"
    ds.SeriesDescription = spec.description
    ds.ManufacturerModelName = "nifti2dicom"
    ds.PatientName = "Anonymous^" + patient
    ds.PatientID = "SCINODE-" + patient.upper()
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Converted from anonymised public NIfTI; no original header"
    ds.BodyPartExamined = spec.body_part
    ds.MRAcquisitionType = spec.mr_acquisition_type
    for k, v in {**CONTRASTS[spec.contrast], **_sidecar_headers(spec.source)}.items():
        setattr(ds, k, v)
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 123.2
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = 3.0
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(spec.name, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = _uid(spec.name, "for")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 1400
    ds.WindowWidth = 2800
    return ds


def _sidecar_headers(source: Path) -> dict[str, object]:
    """Acquisition parameters from the source's BIDS sidecar, when it has one (times s -> ms)."""
    side = source.with_name(source.name.removesuffix(".gz").removesuffix(".nii") + ".json")
    if not side.is_file():
        return {}
    js = json.loads(side.read_text(encoding="utf-8"))
    out: dict[str, object] = {}
    for key, scale in (("EchoTime", 1000.0), ("RepetitionTime", 1000.0), ("InversionTime", 1000.0),
                       ("FlipAngle", 1.0), ("EchoTrainLength", 1.0), ("MagneticFieldStrength", 1.0)):
        if key in js:
            out[key] = round(float(js[key]) * scale, 4) if scale != 1.0 else js[key]
    for key in ("ScanningSequence", "SequenceVariant", "ScanOptions"):
        if key in js:
            out[key] = str(js[key]).split("_")
    for key in ("MRAcquisitionType",):
        if key in js:
            out[key] = str(js[key])
    return out


def spine(spec: SeriesSpec) -> bool:
    """True for the spine series (study description)."""
    return "SPINE" in spec.body_part


def write_series(spec: SeriesSpec, study_uid: str, patient: str) -> list[Path]:
    """Convert ``spec.source`` to one DICOM file per slice in ``spec.out_dir``."""
    img = nib.load(str(spec.source))
    data, affine = _reorient(img, spec.view, spec.crop, spec.upsample_axis)
    pix = _to_uint12(data)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :]
    col_step, row_step = np.linalg.norm(lps[:, 0]), np.linalg.norm(lps[:, 1])
    slice_step = float(np.linalg.norm(lps[:, 2]))
    iop = [*(lps[:, 0] / col_step), *(lps[:, 1] / row_step)]
    base = _base_dataset(spec, study_uid, patient)
    if spec.out_dir.exists():
        shutil.rmtree(spec.out_dir)
    spec.out_dir.mkdir(parents=True)
    paths = []
    for k in range(pix.shape[2]):
        ds = base.copy()
        ds.SOPInstanceUID = _uid(spec.name, "instance", str(k))
        ds.InstanceNumber = k + 1
        ipp = lps @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.SliceLocation = f"{float(ipp @ np.cross(iop[:3], iop[3:])):.6f}"
        ds.PixelSpacing = [f"{row_step:.6f}", f"{col_step:.6f}"]
        ds.SliceThickness = f"{slice_step:.6f}"
        ds.SpacingBetweenSlices = f"{slice_step:.6f}"
        frame = np.ascontiguousarray(pix[:, :, k].T)  # (rows, columns)
        ds.Rows, ds.Columns = frame.shape
        ds.LargestImagePixelValue = int(frame.max())
        ds.SmallestImagePixelValue = int(frame.min())
        ds.PixelData = frame.tobytes()
        ds.InstanceCreationDate, ds.InstanceCreationTime = "20200101", "120000"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = _uid("implementation")
        meta.ImplementationVersionName = "SCINODE_SAMPLE"
        ds.file_meta = meta
        path = spec.out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    if spec.mask is not None:
        shutil.copyfile(spec.mask, spec.out_dir / "cord_mask.nii.gz")
    return paths


def specs(data: Path) -> list[SeriesSpec]:
    """The committed series."""
    from nibabel.testing import data_path

    tests = REPO / "tests" / "data" / "series"
    unf = data / "ivadomed-data-testing"
    pam = data / "sct-testing-data"
    return [
        # PSR volume (384 A->P x 225 I->S x 52 R->L, 1 mm): the 16 sagittal slices around the midline
        # (the cord is in slices 24-35 of the source) and the 120 mm A-P band from the vertebral bodies
        # to the neck muscles behind the canal; the whole S-I extent (foramen magnum to T4).
        SeriesSpec("sample-errsm22-sag-t2w", data / "sct-history/sub-errsm22/anat/sub-errsm22_T2w.nii.gz",
                   REPO / "sample" / "series", "T2w", "sagittal", "CSPINE", "T2 SPACE SAG cervical",
                   crop=(slice(176, 296), slice(0, 225), slice(22, 38)), series_number=1),
        # the former demo sample: name (UID seeds) and crop unchanged, so its files are byte-identical
        SeriesSpec("sample-lumbar-sag-t2w", data / "sct-tutorial-data/sub-lumbar/anat/sub-lumbar_T2w.nii.gz",
                   tests / "lumbar_sag_T2w", "T2w", "sagittal", "LSPINE", "T2 TSE SAG lumbar",
                   crop=(slice(0, 38), slice(0, 112), slice(0, 201)), series_number=3),
        SeriesSpec("test-unf01-ax-t2w", unf / "sub-unf01/anat/sub-unf01_T2w.nii.gz",
                   tests / "unf01_axial_T2w", "T2w", "axial", "CSPINE", "T2 TSE AX cervical",
                   mask=unf / "derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz", series_number=4),
        SeriesSpec("test-pam50-sag-t2w", pam / "sub-PAM50small/anat/sub-PAM50small_T2w.nii.gz",
                   tests / "pam50_sag_T2w", "T2w", "sagittal", "CSPINE", "T2 TSE SAG cervical",
                   crop=(slice(27, 43), slice(0, 70), slice(150, 275)), upsample_axis=2,
                   mask=pam / "derivatives/labels/sub-PAM50small/anat/sub-PAM50small_T2w_seg-manual.nii.gz",
                   series_number=5),
        SeriesSpec("test-brain-ax-t1w", Path(data_path) / "anatomical.nii", tests / "brain_axial_T1w",
                   "T1w", "axial", "HEAD", "T1 MPRAGE AX brain", series_number=2),
    ]


def main() -> int:
    """Write every series; print what was written."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "spine")
    args = ap.parse_args()
    for spec in specs(args.data):
        study = _uid(spec.name.split("-")[1], "study")
        paths = write_series(spec, study, spec.name.split("-")[1])
        size = sum(p.stat().st_size for p in spec.out_dir.iterdir())
        print(f"{spec.out_dir.relative_to(REPO)}: {len(paths)} files, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
