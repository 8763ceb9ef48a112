"""What a lesion family draws, measured on the real training volumes (issue 34).

For ``--draws`` draws of one family on the lesion model's training volumes (model grid, the cord
ROI crop, ``trainer/configs/lesion_recipe040_cv.toml``'s data), prints one JSON line: percentiles
of each lesion's volume (mm³), length along Z (mm), mean intensity over the cord's median (before
the draw), the share of lesions touching the cord's edge, the share per cord column (the lesion's
centroid relative to the cord centre in its slice: central within half the cord's radius, else
dorsal / ventral / lateral by angle), lesions per draw, and the share of draws that changed the
cord mask (swelling)::

    .venv/bin/python bench/lesion_family_stats.py --family columns --draws 200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def column_of(cord_slice: np.ndarray, cy: float, cx: float, spacing_yx: tuple[float, float]) -> str:
    """``central``/``dorsal``/``ventral``/``lateral`` of a point in an axial cord slice ``(Y, X)``."""
    ys, xs = np.nonzero(cord_slice)
    if ys.size == 0:
        return "outside"
    my, mx = ys.mean(), xs.mean()
    ry = max((ys.max() - ys.min() + 1) / 2.0, 1.0)
    rx = max((xs.max() - xs.min() + 1) / 2.0, 1.0)
    dy, dx = (cy - my) / ry, (cx - mx) / rx
    if np.hypot(dy, dx) < 0.5:
        return "central"
    ang = np.degrees(np.arctan2(dy, abs(dx)))  # Y grows towards posterior
    return "dorsal" if ang > 45 else "ventral" if ang < -45 else "lateral"


def lesion_rows(image: np.ndarray, draw, spacing: tuple[float, float, float]) -> list[dict[str, object]]:
    """One row per 26-connected lesion component of ``draw.lesion``."""
    comp, n = ndi.label(draw.lesion > 0, structure=np.ones((3, 3, 3), bool))
    cord_med = float(np.median(image[draw.cord > 0])) if draw.cord.any() else 1.0
    edge = (draw.cord > 0) & ~ndi.binary_erosion(draw.cord > 0, structure=np.ones((1, 3, 3), bool))
    vox = float(np.prod(spacing))
    rows = []
    for i in range(1, n + 1):
        m = comp == i
        zs = np.nonzero(m.any(axis=(1, 2)))[0]
        cz, cy, cx = ndi.center_of_mass(m)
        rows.append({"volume_mm3": float(m.sum()) * vox, "length_mm": float(zs.max() - zs.min() + 1) * spacing[0],
                     "ratio": float(draw.image[m].mean()) / max(cord_med, 1e-6), "touches_edge": bool((m & edge).any()),
                     "column": column_of(draw.cord[int(round(cz))] > 0, cy, cx, spacing[1:])})
    return rows


def main(argv: list[str] | None = None) -> int:
    from trainer.lesion_families import family_generator
    from trainer.segment.train import config_cases, load_config, load_volumes, prep_spec

    p = argparse.ArgumentParser(prog="bench/lesion_family_stats.py")
    p.add_argument("--family", required=True)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--config", type=Path, default=REPO / "trainer" / "configs" / "lesion_recipe040_cv.toml")
    a = p.parse_args(argv)
    cfg = load_config("lesion", a.config)
    vols = load_volumes(config_cases(cfg), prep_spec(cfg), "lesion", 24)
    gen = family_generator(a.family)
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []
    counts, swollen = [], 0
    for k in range(a.draws):
        v = vols[k % len(vols)]
        draw = gen(rng, v.image, v.cord, v.spacing)
        swollen += int(not np.array_equal(draw.cord, v.cord))
        r = lesion_rows(v.image, draw, v.spacing)
        counts.append(len(r))
        rows.extend(r)
    pct = (5, 25, 50, 75, 95)

    def q(key: str) -> list[float]:
        vals = [float(r[key]) for r in rows]  # type: ignore[arg-type]
        return [round(float(x), 2) for x in np.percentile(vals, pct)] if vals else []

    cols = {c: round(sum(r["column"] == c for r in rows) / max(len(rows), 1), 3)
            for c in ("central", "dorsal", "lateral", "ventral")}
    out = {"family": a.family, "draws": a.draws, "lesions": len(rows), "percentiles": list(pct),
           "volume_mm3": q("volume_mm3"), "length_mm": q("length_mm"), "ratio_to_cord_median": q("ratio"),
           "touches_edge": round(sum(bool(r["touches_edge"]) for r in rows) / max(len(rows), 1), 3),
           "columns": cols, "lesions_per_draw": round(float(np.mean(counts)), 2),
           "draws_with_swelling": round(swollen / a.draws, 3)}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
