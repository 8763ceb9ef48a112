"""Write ``trainer/labels/discs.json`` from the disc positions read by eye (see README.md here).

The readings below are canonical-grid indices ``(z, y)`` on canonical sagittal slice ``x``
(:func:`sci_node.preprocess.canonicalise`: ``Z`` inferior->superior, ``Y`` anterior->posterior,
``X`` right->left), read off the PNGs of :mod:`trainer.labels.disc_render`, each the centre of the disc
(middle of its height and of its anterior-posterior depth) on that slice. This script turns
them into patient LPS mm and the voxel index ``(i, j, k)`` of the source NIfTI file as stored
(nibabel/ITK index order), which is what discs.json keeps. Needs ``../shared/data/spine``.

    .venv/bin/python -m trainer.labels.make_discs
"""
from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from trainer.labels.disc_render import load_canonical

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "spine"
OUT = Path(__file__).with_name("discs.json")

CERVICAL = ["C2-C3", "C3-C4", "C4-C5", "C5-C6", "C6-C7", "C7-T1", "T1-T2", "T2-T3", "T3-T4", "T4-T5", "T5-T6"]

#: file, canonical x read on, [(z, y), ...] from the highest disc down, names (None = count not anchored)
READINGS: dict[str, dict[str, object]] = {
    "sct-history/sub-errsm11/anat/sub-errsm11_T2w.nii.gz": {
        "x": 21, "names": CERVICAL,
        "zy": [(179, 178), (161, 178), (143, 180), (127, 183), (111, 185), (94, 194), (75, 206), (58, 215),
               (41, 225), (23, 234)]},
    "sct-history/sub-errsm18/anat/sub-errsm18_T2w.nii.gz": {
        "x": 23, "names": CERVICAL,
        "zy": [(173, 180), (157, 184), (140, 187), (123, 190), (106, 194), (87, 202), (67, 210), (47, 217),
               (27, 224), (7, 230)]},
    "sct-history/sub-errsm20/anat/sub-errsm20_T2w.nii.gz": {
        "x": 25, "names": CERVICAL,
        "zy": [(157, 172), (139, 170), (121, 168), (104, 170), (86, 172), (68, 182), (54, 197), (36, 210),
               (19, 223)]},
    "sct-history/sub-errsm21/anat/sub-errsm21_T2w.nii.gz": {
        "x": 24, "names": CERVICAL,
        "zy": [(178, 194), (161, 194), (145, 195), (128, 195), (110, 195), (89, 200), (69, 210), (51, 221),
               (32, 230), (11, 239)]},
    "sct-history/sub-errsm22/anat/sub-errsm22_T2w.nii.gz": {
        "x": 22, "names": CERVICAL,
        "zy": [(193, 222), (176, 224), (160, 226), (143, 226), (127, 226), (109, 228), (91, 232), (74, 238),
               (55, 248), (36, 253), (16, 256)]},
    "sct-history/sub-errsm23/anat/sub-errsm23_T2w.nii.gz": {
        "x": 22, "names": CERVICAL,
        "zy": [(198, 210), (182, 213), (166, 215), (149, 217), (133, 218), (116, 219), (97, 222), (78, 228),
               (59, 233), (40, 237), (21, 240)]},
    # sacrum and C2 both out of view: positions only, the count is not anchored (see README.md)
    "sct-tutorial-data/sub-lumbar/anat/sub-lumbar_T2w.nii.gz": {
        "x": 19, "names": [None] * 7,
        "zy": [(189, 165), (161, 165), (133, 160), (100, 155), (70, 148), (36, 142), (2, 135)]},
}


def build() -> dict[str, object]:
    series = []
    for rel, r in READINGS.items():
        path = DATA / rel
        can = load_canonical(path)
        src = sitk.ReadImage(str(path))
        discs = []
        for (z, y), name in zip(r["zy"], r["names"]):  # type: ignore[arg-type]
            lps = can.TransformIndexToPhysicalPoint((int(r["x"]), int(y), int(z)))
            ijk = src.TransformPhysicalPointToIndex(lps)
            discs.append({"disc": name, "lps_mm": [round(v, 1) for v in lps], "voxel_ijk": list(ijk),
                          "canonical_zyx": [int(z), int(y), int(r["x"])]})
        person = rel.split("/")[1]
        series.append({"image": rel, "person": person, "anchored": all(n is not None for n in r["names"]),
                       "discs": discs})
    return {"about": "Intervertebral disc centres read by eye on mid-sagittal renders; trainer/labels/README.md",
            "series": series}


def main() -> int:
    data = build()
    lines = ['{"about": ' + json.dumps(data["about"]) + ',', ' "series": [']
    for k, ser in enumerate(data["series"]):
        head = {key: ser[key] for key in ("image", "person", "anchored")}
        lines.append("  " + json.dumps(head)[:-1] + ', "discs": [')
        last = len(ser["discs"]) - 1
        lines += ["   " + json.dumps(d) + ("," if i < last else "") for i, d in enumerate(ser["discs"])]
        lines.append("  ]}" + ("," if k < len(data["series"]) - 1 else ""))
    lines.append(" ]}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
