"""Synthetic body scenes for the routing classifiers: heads, necks/chests/abdomens with a spine, limbs.

A scene is a tissue-label map on a 2 mm LPS grid built from primitives (ellipsoids,
elliptic cylinders, stacked vertebrae); every tissue gets a random intensity around the
contrast of the sampled sequence (or CT Hounsfield units), plus texture and a bias field.
An *exam* then resamples it onto a random acquisition grid the way a site would scan it:

* ``spine`` exam: field of view centred on the spinal column (sagittal 200-340 mm high,
  or axial/coronal 120-220 mm), region = the scene's region (cervical scenes carry a head,
  thoracic ones lungs, lumbar ones a conus and a cauda of CSF);
* ``brain`` exam: the head, 200-260 mm;
* ``abdomen`` exam: the trunk, 320-460 mm, axial or coronal;
* ``other``: a limb (bone, marrow, muscle, fat) in any plane.

Arrays are ``(Z, Y, X)`` = (I→S, A→P, R→L), 2 mm voxels.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from sci_node.routing.evidence import HeaderEvidence
from trainer.classify.data import ANATOMY, REGION, SEQUENCE, sample_header

VOX = 2.0
AIR, FAT, MUSCLE, BONE, MARROW, DISC, CSF, CORD, GM, LIVER, LUNG, KIDNEY, BLOOD, GAS = range(14)
#: mean intensity per tissue for T1w, T2w, T2starw, other (index = tissue id)
MR = np.array([
    [0.0, 0.0, 0.0, 0.0], [0.9, 0.7, 0.5, 0.6], [0.35, 0.25, 0.25, 0.35], [0.05, 0.05, 0.05, 0.05],
    [0.7, 0.5, 0.3, 0.5], [0.3, 0.8, 0.6, 0.45], [0.1, 0.95, 0.85, 0.5], [0.6, 0.35, 0.35, 0.5],
    [0.45, 0.5, 0.6, 0.5], [0.55, 0.3, 0.25, 0.4], [0.03, 0.03, 0.03, 0.03], [0.4, 0.6, 0.45, 0.45],
    [0.2, 0.15, 0.6, 0.3], [0.0, 0.0, 0.0, 0.0]], np.float32)
HU = np.array([-1000, -100, 50, 800, 250, 80, 10, 35, 40, 60, -850, 35, 45, -1000], np.float32)


class Scene:
    """A label map on a 2 mm grid centred on the origin (mm coordinates ``z, y, x``)."""

    def __init__(self, shape_mm: tuple[float, float, float]) -> None:
        self.shape = tuple(int(s / VOX) for s in shape_mm)
        axes = [(np.arange(n) - (n - 1) / 2) * VOX for n in self.shape]
        self.z, self.y, self.x = np.meshgrid(*axes, indexing="ij", sparse=True)
        self.lab = np.zeros(self.shape, np.uint8)

    def ellipsoid(self, c: tuple[float, float, float], r: tuple[float, float, float], tissue: int) -> None:
        m = ((self.z - c[0]) / r[0]) ** 2 + ((self.y - c[1]) / r[1]) ** 2 + ((self.x - c[2]) / r[2]) ** 2 < 1
        self.lab[m] = tissue

    def cylinder(self, c: tuple[float, float], r: tuple[float, float], z0: float, z1: float, tissue: int) -> None:
        """Elliptic cylinder along Z (centre ``(y, x)``, radii ``(ry, rx)``) between ``z0`` and ``z1``."""
        zz = self.z[:, 0, 0]
        k0, k1 = int(np.searchsorted(zz, z0)), int(np.searchsorted(zz, z1, side="right"))
        if k1 <= k0:
            return
        disc = ((self.y[0] - c[0]) / r[0]) ** 2 + ((self.x[0] - c[1]) / r[1]) ** 2 < 1  # (Y, X)
        self.lab[k0:k1][:, disc] = tissue


def _head(s: Scene, rng: np.random.Generator, cz: float) -> None:
    """Scalp, skull, cortex folded at the scale a thumbnail resolves, ventricles, cerebellum, brain stem, eyes."""
    r = np.array([rng.uniform(65, 80), rng.uniform(82, 98), rng.uniform(65, 76)])
    for shell, tissue in ((0, FAT), (4, BONE), (9, CSF), (11, GM), (15, CORD)):
        s.ellipsoid((cz, 0, 0), tuple(r - shell), tissue)
    brain = (s.lab == CORD) | (s.lab == GM)
    if brain.any():
        # gyri and CSF-filled sulci on a 6-10 mm scale (visible at 6-8 mm per thumbnail pixel)
        field = ndi.gaussian_filter(rng.standard_normal(s.shape).astype(np.float32), float(rng.uniform(2.5, 4.0)))
        q = field[brain]
        s.lab[(s.lab == CORD) & (field > np.quantile(q, rng.uniform(0.45, 0.65)))] = GM
        s.lab[brain & (field > np.quantile(q, rng.uniform(0.9, 0.96)))] = CSF
        s.lab[brain & (np.abs(s.x) < 1.5) & (s.z > cz - 10) & (s.y < 0.8 * r[1])] = CSF  # interhemispheric fissure
    vent = rng.uniform(0.7, 1.6)  # ventricle size (age)
    for side in (-1, 1):
        s.ellipsoid((cz + 8, -5 + rng.normal(0, 3), side * 9), (14 * vent, 32, 6 * vent), CSF)
        s.ellipsoid((cz - 0.3 * r[0], -r[1] + 8, side * 32), (11, 11, 11), CSF)  # eyes (vitreous)
    s.ellipsoid((cz - 4, 4, 0), (12, 9, 2.5 * vent), CSF)  # third ventricle
    s.ellipsoid((cz - 0.6 * r[0], 0.45 * r[1], 0), (22, 28, 48), GM)  # cerebellum
    s.cylinder((8, 0), (11, 13), cz - r[0] - 30, cz - 15, CORD)  # brain stem


def _column(s: Scene, rng: np.random.Generator, region: str, yc: float, z0: float, z1: float) -> None:
    """Vertebrae + discs + canal + cord along Z at depth ``yc``; lumbar: the cord ends (conus) high up."""
    rvb = {"cervical": 9, "thoracic": 13, "lumbar": 17}[region] * rng.uniform(0.85, 1.15)
    h = {"cervical": 14, "thoracic": 21, "lumbar": 27}[region] * rng.uniform(0.85, 1.15)
    d = h * rng.uniform(0.2, 0.35)
    z = z0 + rng.uniform(0, h + d)
    while z < z1:
        s.cylinder((yc, 0), (rvb, rvb * 1.2), z, z + h, BONE)
        s.cylinder((yc, 0), (rvb - 2, rvb * 1.2 - 2), z + 1.5, z + h - 1.5, MARROW)
        s.cylinder((yc, 0), (rvb, rvb * 1.2), z + h, z + h + d, DISC)
        s.cylinder((yc + rvb + 16, 0), (8, 14), z + 2, z + h - 2, MARROW)  # posterior elements
        z += h + d
    rc = rng.uniform(6, 9)
    s.cylinder((yc + rvb + rc + 1, 0), (rc, rc * 1.3), z0, z1, CSF)
    rcord = {"cervical": 4.5, "thoracic": 3.5, "lumbar": 4.0}[region] * rng.uniform(0.85, 1.15)
    cord_z0 = z0 if region != "lumbar" else rng.uniform(z0 + 0.6 * (z1 - z0), z1)
    s.cylinder((yc + rvb + rc + 1, 0), (rcord, rcord * 1.3), cord_z0, z1, CORD)


def trunk(rng: np.random.Generator, region: str) -> tuple[Scene, tuple[float, float, float]]:
    """A neck (+ head), chest or abdomen with its spine; returns the scene and the column centre (z, y, x) mm."""
    length = 360.0
    if region == "cervical":
        ry, rx = rng.uniform(48, 62), rng.uniform(52, 68)
        s = Scene((length + 100, 220, 240))
        s.cylinder((0, 0), (ry, rx), -length / 2, length / 2 - 60, FAT)
        s.cylinder((0, 0), (ry - 6, rx - 6), -length / 2, length / 2 - 60, MUSCLE)
        s.cylinder((8, 0), (ry * 2, rx * 2.6), -length / 2, -length / 2 + 90, FAT)  # shoulders
        _head(s, rng, length / 2 + 10)
        yc = ry * 0.15
    else:
        ry, rx = rng.uniform(90, 125), rng.uniform(135, 175)
        s = Scene((length, 2 * ry + 20, 2 * rx + 20))
        s.cylinder((0, 0), (ry, rx), -length / 2, length / 2, FAT)
        f = rng.uniform(8, 28)
        s.cylinder((0, 0), (ry - f, rx - f), -length / 2, length / 2, MUSCLE)
        if region == "thoracic":
            for side in (-1, 1):
                s.ellipsoid((0, -5, side * rx * 0.45), (170, ry * 0.7, rx * 0.38), LUNG)
            s.ellipsoid((-40, -ry * 0.35, rx * 0.12), (55, 45, 55), BLOOD)
        else:
            s.ellipsoid((rng.uniform(20, 80), -10, -rx * 0.35), (70, ry * 0.6, rx * 0.4), LIVER)
            s.ellipsoid((60, ry * 0.35, rx * 0.45), (45, 30, 25), KIDNEY)
            for side in (-1, 1):
                s.ellipsoid((rng.uniform(-40, 20), ry * 0.45, side * rx * 0.32), (50, 22, 25), KIDNEY)
            for _ in range(int(rng.integers(3, 9))):
                s.ellipsoid((rng.uniform(-150, 150), rng.uniform(-ry * 0.6, 0), rng.uniform(-rx * 0.5, rx * 0.5)),
                            tuple(rng.uniform(8, 25, 3)), GAS)
        yc = ry * 0.45
    s.cylinder((yc - 25, -12), (10, 10), -length / 2, length / 2, BLOOD)  # aorta
    _column(s, rng, region, yc, -length / 2, length / 2 - (60 if region == "cervical" else 0))
    return s, (0.0, yc, 0.0)


def head(rng: np.random.Generator) -> Scene:
    s = Scene((300, 240, 200))
    s.cylinder((0, 0), (50, 55), -150, 0, FAT)
    s.cylinder((0, 0), (44, 49), -150, 0, MUSCLE)
    _head(s, rng, 40)
    return s


def limb(rng: np.random.Generator) -> Scene:
    r = rng.uniform(35, 80)
    s = Scene((300, 2 * r + 30, 2 * r + 30))
    s.cylinder((0, 0), (r, r * rng.uniform(0.8, 1.2)), -150, 150, FAT)
    s.cylinder((0, 0), (r - 8, r * 0.9 - 8), -150, 150, MUSCLE)
    rb = rng.uniform(10, 18)
    s.cylinder((rng.uniform(-8, 8), 0), (rb, rb), -150, 150, BONE)
    s.cylinder((0, 0), (rb - 4, rb - 4), -150, 150, MARROW)
    if rng.random() < 0.5:  # a joint
        s.ellipsoid((0, 0, 0), (25, rb * 2.2, rb * 2.4), MARROW)
        s.cylinder((0, 0), (rb * 2.4, rb * 2.6), -4, 4, DISC)
    return s


def render(s: Scene, rng: np.random.Generator, seq: str, ct: bool) -> sitk.Image:
    """Tissue intensities + texture + bias field -> float32 SimpleITK image (identity direction, 2 mm)."""
    if ct:
        vals = HU + rng.normal(0, 15, HU.shape).astype(np.float32)
        arr = vals[s.lab] + rng.normal(0, 12, s.shape).astype(np.float32)
    else:
        col = MR[:, SEQUENCE.index(seq)]
        vals = np.clip(col + rng.normal(0, 0.07, col.shape), 0, None).astype(np.float32)
        vals[[AIR, GAS, LUNG]] = col[[AIR, GAS, LUNG]]
        if seq == "other" and rng.random() < 0.5:  # fat-suppressed EPI / DWI: scalp and marrow fat dark
            vals[[FAT, MARROW]] *= 0.15
        coarse = rng.standard_normal((3, 3, 3)).astype(np.float32)
        # bias amplitude from 1.5 T (flat) to 7 T (strong B1 inhomogeneity)
        zoomed = ndi.zoom(coarse, [n / 3 for n in s.shape], order=1)[: s.shape[0], : s.shape[1], : s.shape[2]]
        bias = np.exp(rng.uniform(0.1, 0.6) * zoomed)
        arr = vals[s.lab] * bias + rng.normal(0, rng.uniform(0.01, 0.04), s.shape).astype(np.float32)
        arr = np.abs(arr) * float(rng.uniform(200, 3000))
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing([VOX] * 3)
    img.SetOrigin([-(n - 1) / 2 * VOX for n in s.shape[::-1]])
    return img


def acquire(img: sitk.Image, rng: np.random.Generator, view: str, centre: np.ndarray, fov: tuple[float, float],
            air: float, lowres: bool = False) -> sitk.Image:
    """Resample ``img`` onto an acquisition in ``view`` (in-plane FOV ``(rows, cols)`` mm) centred at ``centre``.

    The grid is one of: a 2-D stack (2-6 mm slices), a 3-D isotropic slab (0.8-1.2 mm,
    40-64 partitions), or, for axial views, a few thick slabs (5-16 mm). ``lowres``: an
    EPI-like matrix (1.8-3.5 mm pixels).
    """
    from trainer.classify.synth import _frame

    inplane = float(rng.uniform(0.6, 1.4)) * max(fov) / 300
    mode = rng.random()
    if lowres:  # EPI-like: coarse matrix (64-128) whatever the field of view
        inplane = max(inplane, float(rng.uniform(1.8, 3.5)))
    if mode < 0.2 and not lowres:  # 3-D isotropic slab (e.g. 1 mm sagittal, 40-64 partitions)
        inplane = thick = float(rng.uniform(0.8, 1.2))
        n = int(rng.integers(40, 65))
    elif view == "axial" and mode < 0.5:  # thick axial slabs (5-16 mm, few slices)
        thick, n = float(rng.uniform(5.0, 16.0)), int(rng.integers(3, 21))
    else:
        low = max(2.0, 1.8 * inplane)
        thick = float(rng.uniform(low, max(6.0, low + 1.0)))
        n = int(rng.integers(8, 30)) if view != "axial" else int(rng.integers(6, 40))
    if rng.random() < 0.08:  # localisers and single-slice series
        n = int(rng.integers(1, 4))
    size = [int(fov[1] / inplane), int(fov[0] / inplane), n]
    size = [max(8, min(s, 448)) for s in size[:2]] + [n]
    spacing = [fov[1] / size[0], fov[0] / size[1], thick]
    d = _frame(view, rng, max_tilt=10.0)
    origin = centre - d @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                         d.flatten().tolist(), air, sitk.sitkFloat32)


def scene_sample(rng: np.random.Generator, anatomy: str) -> tuple[sitk.Image, HeaderEvidence | None, dict[str, int]]:
    """One synthetic exam of ``anatomy`` (``spine``/``brain``/``abdomen``/``other``) with its labels."""
    from sci_node.routing.cls_features import view_of_image

    seq = SEQUENCE[int(rng.integers(len(SEQUENCE)))]
    ct = anatomy == "abdomen" and rng.random() < 0.3
    region = -1
    if anatomy == "spine":
        reg = REGION[int(rng.integers(3))]
        region = REGION.index(reg)
        s, col = trunk(rng, reg)
        view = ("sagittal", "axial", "coronal")[int(rng.choice(3, p=[0.5, 0.4, 0.1]))]
        # sagittal/coronal: from tight crops to full fields of view (brain stem to thoracic, up to 420 x 400 mm);
        # axial: whole neck/trunk sections or tight crops around the canal (0.3-0.5 mm pixels)
        fov = (rng.uniform(180, 420), rng.uniform(150, 400)) if view != "axial" else (
            (rng.uniform(120, 220),) * 2 if rng.random() < 0.5 else (rng.uniform(40, 120),) * 2)
        centre = np.array([col[2], col[1] + rng.normal(0, 8), col[0] + rng.normal(0, 30)])
    elif anatomy == "abdomen":
        s, _ = trunk(rng, "lumbar" if rng.random() < 0.7 else "thoracic")
        view = "axial" if rng.random() < 0.7 else "coronal"
        # whole-trunk exams and crops anywhere in the trunk (organ-centred fields of view)
        w = rng.uniform(320, 460) if rng.random() < 0.5 else float(np.exp(rng.uniform(np.log(80), np.log(320))))
        fov = (w * 0.8, w)
        half = np.array(s.shape[::-1], float) * VOX / 2  # (x, y, z) half extents of the scene
        slack = np.clip(half - w / 2, 0, None) * 0.8
        centre = np.array([rng.uniform(-slack[0], slack[0]), rng.uniform(-slack[1], slack[1]), rng.normal(0, 40)])
    elif anatomy == "brain":
        s = head(rng)
        view = ("sagittal", "axial", "coronal")[int(rng.integers(3))]
        zoom = rng.random() < 0.3  # 30 % of the brain exams are zoomed crops (20-200 mm) inside the head
        fov = (float(np.exp(rng.uniform(np.log(20), np.log(200)))) if zoom else rng.uniform(200, 260),) * 2
        spread = 30.0 if zoom else 10.0
        centre = np.array([rng.normal(0, spread), rng.normal(0, spread), 40 + rng.normal(0, spread)])
    else:
        s = limb(rng)
        view = ("sagittal", "axial", "coronal")[int(rng.integers(3))]
        fov = (float(np.exp(rng.uniform(np.log(40), np.log(260)))),) * 2
        centre = np.array([rng.normal(0, 10), rng.normal(0, 10), rng.normal(0, 40)])
    img = render(s, rng, seq, ct)
    out = acquire(img, rng, view, centre, fov, -1000.0 if ct else 0.0, lowres=seq == "other" and rng.random() < 0.4)
    hdr = None if ct or rng.random() < 0.4 else sample_header(seq, rng)
    return out, hdr, {"anatomy": ANATOMY.index(anatomy), "region": region,
                      "view": ("sagittal", "axial", "coronal").index(view_of_image(out)),
                      "sequence": -1 if ct else SEQUENCE.index(seq)}
