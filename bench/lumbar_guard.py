"""Benchmark: what the active models must not do on a lumbar series — cord below the conus, lesions.

Prints numbers, never passes or fails (accuracy targets live in benchmarks): cord voxels more
than 10 mm below the conus (target 0), lesions found (target 0), cord voxels above the conus
(the guard must not pass by finding nothing). ``.venv/bin/python bench/lumbar_guard.py``

``tests/data/series/lumbar_sag_T2w`` (the demo sample until issue #15: sagittal T2w, lower
thoracic cord, conus medullaris and cauda equina with no visible lesion) goes through
the node's own pipeline (:class:`sci_node.pipeline.Pipeline` with the active models of
``models/``, the default routing rules), and the DICOM-SEG it writes is read back with highdicom.

The conus level was read off the series by eye (``docs/img/lumbar-conus.png``): in axial
reformats of the sagittal slices the cord is a round, homogeneous disc inside the CSF down to
row 88 of the images, a smaller irregular central blob at rows 90-92, and from row 94 on only
the speckled cluster of nerve roots lying dorsally in the sac (the cauda equina); the midline
sagittal images (instances 20-24 of 38) show the same taper. Conus tip: row 92, i.e. patient z =
-312.30 - 92 = -404.3 mm (rows run exactly inferior, 1 mm apart, from ImagePositionPatient z
-312.302551). With a 10 mm margin for the uncertainty of that reading, no cord voxel may lie
below z = -414.3 mm (row 102).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LUMBAR = REPO / "tests" / "data" / "series" / "lumbar_sag_T2w"
#: patient z (LPS, mm) of the conus medullaris tip in the lumbar series (row 92; see the docstring)
CONUS_TIP_Z_MM = -404.3
#: how far below the tip a cord voxel is certainly wrong (the reading is good to a few mm)
MARGIN_MM = 10.0


def _patient_z(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Patient z (LPS, mm) of every nonzero voxel of ``mask`` ``(Z, Y, X)`` on ``image``'s grid."""
    kji = np.argwhere(mask > 0)
    ijk = kji[:, ::-1].astype(float) * np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return (np.asarray(image.GetOrigin()) + ijk @ direction.T)[:, 2]


def main(argv: list[str] | None = None) -> int:
    """Run the active models through the node's pipeline on the lumbar series; print the guard numbers.

    ``--models DIR`` reads another registry folder (a candidate activated in a copy of ``models/``).
    """
    import argparse

    import highdicom as hd
    import torch

    from sci_node.config import RoutingRules
    from sci_node.models.registry import ModelRegistry
    from sci_node.pipeline import Pipeline
    from sci_node.pipeline.series import read_series

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models", help="registry folder (default: models/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    files = sorted(LUMBAR.glob("*.dcm"))
    pipeline = Pipeline(ModelRegistry(args.models).load_active("cpu"), RoutingRules(), "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        result = pipeline.run_dicom(files, Path(tmp))
        vol = read_series(files)
        masks: dict[int, np.ndarray] = {}
        for p in [p for p in result.outputs if p.name == "seg.dcm"]:
            seg = hd.seg.segread(p)
            uids = [r.sop_instance_uid for r in vol.refs]
            for n in seg.segment_numbers:
                masks[n] = seg.get_pixels_by_source_instance(uids, segment_numbers=[n],
                                                             skip_overlap_checks=True)[..., 0]
    z = _patient_z(vol.image, masks[1]) if 1 in masks else np.zeros(0)
    out = {"models": result.model_versions, "status": result.status,
           "cord_voxels_below_conus_minus_10mm": int(np.count_nonzero(z < CONUS_TIP_Z_MM - MARGIN_MM)),
           "lowest_cord_z_mm": float(z.min()) if z.size else None,
           "cord_voxels_above_conus": int(np.count_nonzero(z >= CONUS_TIP_Z_MM)),
           "lesions": int(result.summary.get("lesion_count") or 0),
           "lesion_voxels": int(np.count_nonzero(masks[2])) if 2 in masks else 0}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
