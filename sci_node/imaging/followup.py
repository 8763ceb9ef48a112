"""Follow-up comparison of two time points of one person's cord (issue 39): what changed since the prior.

Pure image math on SimpleITK images (LPS geometry) and ``(Z, Y, X)`` uint8 masks on their grids;
no I/O. Steps:

1. **Register** the prior image to the current one, rigidly (6 degrees of freedom), on the cord:
   Mattes mutual information inside the current cord dilated by ``margin_mm``, initialised by
   the two cords' centres of mass, two resolution levels (:func:`register_rigid`).
2. **Check** the registration (:func:`registration_check`): the prior cord moved onto the current
   grid must overlap the current cord with Dice >= ``min_cord_dice`` over the slices both cover,
   and their centre lines must lie within ``max_centerline_mm`` of each other (median). A failed
   check refuses the comparison with the numbers; nothing is guessed. A registration that fails the
   check is started once more (another metric sample, half the step) and the better one is kept.
3. **Match lesions** (:func:`match_lesions`): each current lesion (26-connected component) is
   matched to the prior lesions its voxels touch once the prior lesion mask is moved onto the
   current grid (dilated by ``match_tolerance_mm`` for the residual misregistration). Volumes
   are measured on each time point's own grid. The rule:

   * **new**: no prior lesion touches it;
   * **enlarging**: ``now >= then * (1 + enlarge_fraction)`` and ``now - then >= min_change_mm3``
     (defaults 0.5 and 10 mm3: a 50 % increase, beyond what a one-voxel shift of the boundary of
     a small lesion explains);
   * **shrinking**: the same two conditions the other way round;
   * **stable**: otherwise; **resolved**: a prior lesion no current lesion touches.

4. **New by subtraction** (:func:`new_by_difference`): the prior image resampled onto the current grid
   is subtracted from the current one, each divided by its cord median; a component inside both cords
   (the current one eroded by ``diff_erode_mm``) that rises by ``max(diff_min_rise, diff_k`` robust SDs),
   is brighter than the cord, spans ``diff_min_mm3``, rises somewhere by more than a shift of
   ``diff_shift_mm`` explains (:func:`shift_explained`) and touches no lesion of either time point is a
   new lesion ``found_by`` "subtraction": a lesion the lesion model did not segment still shows as new. A lesion
   the model marks only now but that did not rise on the subtraction (median < ``diff_confirm_rise``) was there
   before, unsegmented: it is "stable", not new (:func:`confirm_new`).
5. **Cord area**: the C2-C3 mean CSA then and now (when both time points have vertebral levels),
   and its change in %.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from sci_node.imaging.postprocess import dilate_mm

_CONN26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class FollowupRules:
    """The comparison's thresholds (``[followup]``; the defaults are the documented rule)."""

    margin_mm: float = 10.0
    min_cord_dice: float = 0.6
    max_centerline_mm: float = 3.0
    match_tolerance_mm: float = 1.5
    enlarge_fraction: float = 0.5
    min_change_mm3: float = 10.0
    #: new hyperintensities on the subtraction (current - moved prior, each divided by its cord's median):
    #: a rise of at least ``diff_min_rise`` and ``diff_k`` robust SDs of the difference inside the cord
    #: (eroded by ``diff_erode_mm``: the cord's rim is where misregistration and partial volume differ)
    diff_enabled: bool = True
    diff_k: float = 5.0
    diff_min_rise: float = 0.15
    diff_min_mm3: float = 5.0
    diff_erode_mm: float = 0.0
    #: a residual misregistration of this much (mm) explains a rise up to ``diff_shift_mm`` times the local
    #: intensity gradient (per mm, the larger of the two images'); a component none of whose voxels rises beyond
    #: that is the cord's edge against bright CSF seen a fraction of a voxel apart, not a new lesion
    diff_shift_mm: float = 0.15
    #: a lesion the lesion model marks only now is new only if it rose on the subtraction by this much (median
    #: over its voxels); otherwise it was there before, unsegmented: "stable" (the model's flicker, not a change)
    diff_confirm_rise: float = 0.06
    #: the CSA's measurement error: the root-mean-square difference of the node's same-stretch CSA between two scans
    #: of the same cord (6 real scan-rescan pairs, bench/followup.py, session 23: 1.55 %); a change is beyond it
    #: when larger than 1.96 times this (the 95 % limit of the paired differences: 3.0 %)
    csa_error_pct: float = 1.55


@dataclass(frozen=True)
class RegistrationCheck:
    """How well the prior cord lies on the current one after registration."""

    passed: bool
    cord_dice: float
    centerline_mm: float | None
    reason: str | None = None


@dataclass(frozen=True)
class LesionChange:
    """One lesion's change: ``status`` new | enlarging | stable | shrinking | resolved."""

    status: str
    volume_then_mm3: float
    volume_now_mm3: float
    current_id: int | None
    prior_ids: tuple[int, ...]
    centroid_index_zyx: tuple[float, float, float]
    #: what found it: "lesion model" (a current lesion) or "subtraction" (a new hyperintensity the lesion
    #: model did not segment, :func:`new_by_difference`)
    found_by: str = "lesion model"


@dataclass(frozen=True)
class Comparison:
    """The result: the check, each lesion's change, counts and the new-or-enlarging mask on the current grid."""

    check: RegistrationCheck
    lesions: list[LesionChange] = field(default_factory=list)
    new_or_enlarging: np.ndarray | None = None
    transform: tuple[float, ...] = ()
    #: the cord's mean area over the stretch both scans cover (:func:`csa_common_stretch`)
    csa_common: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Lesions per status."""
        out = {s: 0 for s in ("new", "enlarging", "stable", "shrinking", "resolved")}
        for c in self.lesions:
            out[c.status] += 1
        return out


def _mask_image(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(like)
    return img


def register_rigid(prior: sitk.Image, prior_cord: np.ndarray, current: sitk.Image, current_cord: np.ndarray,
                   rules: FollowupRules = FollowupRules(), seed: int = 0, learning_rate: float = 1.0) -> sitk.Transform:
    """A rigid transform mapping current physical points to prior ones (SimpleITK's resampling convention).

    Parameters
    ----------
    prior, current
        The two images (scalar, any spacing; LPS).
    prior_cord, current_cord
        ``(Z, Y, X)`` cord masks on each image's grid; their centres of mass initialise the fit and
        the current cord dilated by ``rules.margin_mm`` is where the metric is evaluated.
    """
    spacing = tuple(float(s) for s in current.GetSpacing()[::-1])
    near = dilate_mm(current_cord > 0, spacing, rules.margin_mm)  # type: ignore[arg-type]
    # only the cord's neighbourhood takes part: crop both images around their cords (physical space is kept)
    fixed = sitk.Cast(_crop_around(current, near, 0.0), sitk.sitkFloat32)
    moving = sitk.Cast(_crop_around(prior, prior_cord > 0, 2 * rules.margin_mm), sitk.sitkFloat32)
    region = _crop_around(_mask_image(near, current), near, 0.0)
    init = sitk.CenteredTransformInitializer(_mask_image(current_cord > 0, current),
                                             _mask_image(prior_cord > 0, prior), sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.5, seed)
    reg.SetMetricFixedMask(region)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def _crop_around(image: sitk.Image, mask: np.ndarray, margin_mm: float) -> sitk.Image:
    """``image`` cut to the bounding box of ``mask`` (``(Z, Y, X)``) widened by ``margin_mm``; geometry kept."""
    if not mask.any():
        return image
    spacing_zyx = np.asarray(image.GetSpacing()[::-1], dtype=float)
    pad = np.ceil(margin_mm / spacing_zyx).astype(int)
    idx = np.nonzero(mask)
    lo = np.maximum([int(i.min()) for i in idx] - pad, 0)
    hi = np.minimum([int(i.max()) + 1 for i in idx] + pad, mask.shape)
    return sitk.RegionOfInterest(image, [int(v) for v in (hi - lo)[::-1]], [int(v) for v in lo[::-1]])


def to_current(mask: np.ndarray, prior: sitk.Image, current: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """A prior ``(Z, Y, X)`` mask or label image moved onto the current grid (nearest neighbour: labels kept)."""
    img = sitk.GetImageFromArray(mask.astype(np.uint16))
    img.CopyInformation(prior)
    out = sitk.Resample(img, current, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return sitk.GetArrayFromImage(out).astype(mask.dtype if mask.dtype != bool else np.uint8)


def _centerline(mask: np.ndarray, axis: int) -> dict[int, np.ndarray]:
    out = {}
    for k in range(mask.shape[axis]):
        sl = np.take(mask, k, axis=axis)
        if sl.any():
            out[k] = np.array(ndi.center_of_mass(sl))
    return out


def registration_check(moved_cord: np.ndarray, current_cord: np.ndarray, spacing_zyx: tuple[float, float, float],
                       si_axis: int, rules: FollowupRules = FollowupRules()) -> RegistrationCheck:
    """Dice of the moved prior cord and the current cord over the slices both cover, and the median
    distance between their centre lines (mm); ``passed`` when both are within ``rules``."""
    both = [k for k in range(current_cord.shape[si_axis])
            if np.take(moved_cord, k, axis=si_axis).any() and np.take(current_cord, k, axis=si_axis).any()]
    if len(both) < 3:
        return RegistrationCheck(False, 0.0, None, f"the two cords share {len(both)} slices after registration "
                                 "(at least 3 needed): not the same part of the spine, or the registration failed")
    a = np.take(moved_cord > 0, both, axis=si_axis)
    b = np.take(current_cord > 0, both, axis=si_axis)
    dice = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
    ca, cb = _centerline(a, si_axis), _centerline(b, si_axis)
    inplane = [s for i, s in enumerate(spacing_zyx) if i != si_axis]
    dists = [float(np.linalg.norm((ca[k] - cb[k]) * inplane)) for k in ca if k in cb]
    cl = float(np.median(dists)) if dists else None
    problems = []
    if dice < rules.min_cord_dice:
        problems.append(f"cord Dice after registration {dice:.3f} < {rules.min_cord_dice}")
    if cl is None or cl > rules.max_centerline_mm:
        problems.append(f"centre lines {cl if cl is None else round(cl, 2)} mm apart (median) > "
                        f"{rules.max_centerline_mm} mm")
    return RegistrationCheck(not problems, round(dice, 4), None if cl is None else round(cl, 3),
                             "; ".join(problems) or None)


def _volumes(labels: np.ndarray, n: int, voxel_mm3: float) -> dict[int, float]:
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    return {i: float(counts[i]) * voxel_mm3 for i in range(1, n + 1)}


def _status(then: float, now: float, rules: FollowupRules) -> str:
    if now >= then * (1 + rules.enlarge_fraction) and now - then >= rules.min_change_mm3:
        return "enlarging"
    if then >= now * (1 + rules.enlarge_fraction) and then - now >= rules.min_change_mm3:
        return "shrinking"
    return "stable"


def prior_labels(prior_lesion: np.ndarray) -> tuple[np.ndarray, int]:
    """The prior lesions as 26-connected components (ids 1..n) on the prior grid."""
    lab, n = ndi.label(prior_lesion > 0, structure=_CONN26)
    return lab.astype(np.int32), int(n)


def match_lesions(plab: np.ndarray, moved_plab: np.ndarray, current_lesion: np.ndarray,
                  prior_voxel_mm3: float, current_spacing_zyx: tuple[float, float, float],
                  rules: FollowupRules = FollowupRules()) -> tuple[list[LesionChange], np.ndarray]:
    """Classify every lesion (see the module docstring); also the new-or-enlarging mask on the current grid.

    Parameters
    ----------
    plab
        ``(Z, Y, X)`` prior lesion components on the prior grid (:func:`prior_labels`; their volumes).
    moved_plab
        The same labels moved onto the current grid (:func:`to_current`): where the prior lesions are now.
    current_lesion
        ``(Z, Y, X)`` current lesion mask.
    """
    pn = int(plab.max())
    pvol = _volumes(plab, pn, prior_voxel_mm3)
    near = dilate_mm(moved_plab > 0, current_spacing_zyx, rules.match_tolerance_mm)
    grown = _grow_labels(moved_plab, near)
    clab, cn = ndi.label(current_lesion > 0, structure=_CONN26)
    cvol = _volumes(clab, cn, float(np.prod(current_spacing_zyx)))
    changes: list[LesionChange] = []
    flagged = np.zeros(current_lesion.shape, np.uint8)
    touched: set[int] = set()
    for i in range(1, cn + 1):
        comp = clab == i
        ids = tuple(sorted(int(v) for v in np.unique(grown[comp]) if v > 0))
        touched.update(ids)
        then = sum(pvol.get(j, 0.0) for j in ids)
        status = "new" if not ids else _status(then, cvol[i], rules)
        if status in ("new", "enlarging"):
            flagged[comp] = 1
        cz = tuple(round(float(v), 2) for v in ndi.center_of_mass(comp))
        changes.append(LesionChange(status, round(then, 2), round(cvol[i], 2), i, ids, cz))  # type: ignore[arg-type]
    for j in range(1, pn + 1):
        if j not in touched:
            cz = tuple(round(float(v), 2) for v in ndi.center_of_mass(plab == j))
            changes.append(LesionChange("resolved", round(pvol[j], 2), 0.0, None, (j,), cz))  # type: ignore[arg-type]
    return changes, flagged


def _grow_labels(labels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Labels grown into ``region`` (nearest label wins): the tolerance band around each prior lesion."""
    if not labels.any():
        return labels
    _, idx = ndi.distance_transform_edt(labels == 0, return_indices=True)
    grown = labels[tuple(idx)]
    return np.where(region, grown, 0)


def compare(prior: sitk.Image, prior_cord: np.ndarray, prior_lesion: np.ndarray, current: sitk.Image,
            current_cord: np.ndarray, current_lesion: np.ndarray, si_axis: int,
            rules: FollowupRules = FollowupRules()) -> Comparison:
    """Register, check, and when the check passes classify every lesion (module docstring).

    ``si_axis`` is the current grid's superior-inferior array axis
    (:func:`sci_node.imaging.measure.si_axis`).
    """
    spacing = tuple(float(s) for s in current.GetSpacing()[::-1])
    transform, moved_cord, check = None, None, None
    # a second start (another metric sample, half the step) when the first fails the check: the optimiser
    # can run off on a short axial stack (measured once on a real rescan pair, cord Dice 0 after 150 steps)
    for seed, rate in ((0, 1.0), (1, 0.5)):
        t = register_rigid(prior, prior_cord, current, current_cord, rules, seed=seed, learning_rate=rate)
        m = to_current(prior_cord, prior, current, t)
        c = registration_check(m, current_cord, spacing, si_axis, rules)  # type: ignore[arg-type]
        if check is None or c.cord_dice > check.cord_dice:
            transform, moved_cord, check = t, m, c
        if check.passed:
            break
    assert transform is not None and moved_cord is not None and check is not None
    params = tuple(round(float(v), 4) for v in transform.GetParameters()) if hasattr(transform, "GetParameters") \
        else ()
    if not check.passed:
        return Comparison(check, transform=params)
    plab, _ = prior_labels(prior_lesion)
    moved = to_current(plab, prior, current, transform)
    changes, flagged = match_lesions(plab, moved, current_lesion, float(np.prod(prior.GetSpacing())),
                                     spacing, rules)  # type: ignore[arg-type]
    if rules.diff_enabled:
        moved_image = sitk.GetArrayFromImage(sitk.Resample(prior, current, transform, sitk.sitkLinear, 0.0,
                                                           sitk.sitkFloat32))
        cur_array = sitk.GetArrayFromImage(current).astype(np.float32)
        changes = confirm_new(changes, flagged, current_lesion, cur_array, moved_image, current_cord > 0,
                              moved_cord > 0, rules)
        known = dilate_mm((moved > 0) | (current_lesion > 0), spacing, rules.match_tolerance_mm)  # type: ignore
        for comp in new_by_difference(cur_array, moved_image, current_cord > 0, moved_cord > 0,
                                      known, spacing, rules):  # type: ignore[arg-type]
            flagged[comp] = 1
            cz = tuple(round(float(v), 2) for v in ndi.center_of_mass(comp))
            vol = round(float(comp.sum()) * float(np.prod(spacing)), 2)
            changes.append(LesionChange("new", 0.0, vol, None, (), cz, "subtraction"))  # type: ignore[arg-type]
    csa = csa_common_stretch(prior_cord, prior, current_cord, current, transform, si_axis)
    return Comparison(check, changes, flagged, params, csa)


def csa_common_stretch(prior_cord: np.ndarray, prior: sitk.Image, current_cord: np.ndarray, current: sitk.Image,
                       transform: sitk.Transform, si_axis: int, trim: int = 1) -> dict[str, Any]:
    """The cord's mean cross-section then and now over the slices both scans cover, on the current grid.

    The prior cord is moved onto the current grid with linear interpolation of its 0/1 mask (partial
    volume kept, so its area is not quantised by the resampling); per slice across ``si_axis`` both areas are
    summed (voxel fractions x in-plane voxel area, mm2); the slices where both cords are present, less
    ``trim`` at each end of that stretch, are averaged. Each scan's whole-cord mean compares different
    stretches when the two fields of view differ; this compares the same one.

    Returns
    -------
    dict
        ``{"then_mm2", "now_mm2", "change_pct", "slices"}`` (None values when fewer than 3 slices overlap).
    """
    img = sitk.GetImageFromArray((prior_cord > 0).astype(np.float32))
    img.CopyInformation(prior)
    moved = sitk.GetArrayFromImage(sitk.Resample(img, current, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    spacing = current.GetSpacing()[::-1]
    plane = [a for a in range(3) if a != si_axis]
    pixel = float(spacing[plane[0]] * spacing[plane[1]])
    then = moved.sum(axis=tuple(plane)) * pixel
    now = (current_cord > 0).sum(axis=tuple(plane)) * pixel
    both = np.flatnonzero((then > 2 * pixel) & (now > 0))
    if both.size == 0:
        return {**csa_change(None, None), "slices": 0}
    keep = both[(both >= both.min() + trim) & (both <= both.max() - trim)]
    if keep.size < 3:
        return {**csa_change(None, None), "slices": int(keep.size)}
    return {**csa_change(round(float(then[keep].mean()), 3), round(float(now[keep].mean()), 3)),
            "slices": int(keep.size)}


def normalised_difference(current: np.ndarray, moved_prior: np.ndarray,
                          region: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(cur, pri, cur - pri)``: ``current`` and ``moved_prior`` each divided by its own median over ``region``,
    and their difference; None when ``region`` holds fewer than 50 voxels. All ``(Z, Y, X)`` on the current grid."""
    if region.sum() < 50:
        return None
    cur = current / max(float(np.median(current[region])), 1e-6)
    pri = moved_prior / max(float(np.median(moved_prior[region])), 1e-6)
    return cur, pri, (cur - pri).astype(np.float32)


def confirm_new(changes: list[LesionChange], flagged: np.ndarray, current_lesion: np.ndarray, current: np.ndarray,
                moved_prior: np.ndarray, current_cord: np.ndarray, moved_cord: np.ndarray,
                rules: FollowupRules = FollowupRules()) -> list[LesionChange]:
    """Keep "new" only for lesion-model lesions that rose on the subtraction; the others were there before.

    A lesion the model segments in the follow-up but not in the prior, where the prior image (moved onto the
    current grid) was already as bright (median normalised rise over its voxels < ``rules.diff_confirm_rise``), is
    the same hyperintensity segmented only now: it becomes "stable" (then = now, ``found_by`` says why) and leaves
    ``flagged`` (changed in place). ``current_lesion`` is labelled as :func:`match_lesions` labels it.
    """
    got = normalised_difference(current, moved_prior, current_cord & moved_cord & (moved_prior > 0))
    if got is None:
        return changes
    diff = got[2]
    clab, _ = ndi.label(current_lesion > 0, structure=_CONN26)
    out = []
    for c in changes:
        if c.status == "new" and c.found_by == "lesion model" and c.current_id:
            comp = clab == c.current_id
            if float(np.median(diff[comp])) < rules.diff_confirm_rise:
                flagged[comp] = 0
                c = LesionChange("stable", c.volume_now_mm3, c.volume_now_mm3, c.current_id, c.prior_ids,
                                 c.centroid_index_zyx, "lesion model; as bright in the prior (not segmented then)")
        out.append(c)
    return out


def new_by_difference(current: np.ndarray, moved_prior: np.ndarray, current_cord: np.ndarray,
                      moved_cord: np.ndarray, known: np.ndarray, spacing_zyx: tuple[float, float, float],
                      rules: FollowupRules = FollowupRules()) -> list[np.ndarray]:
    """New hyperintensities in the cord that no lesion mask explains, from the subtraction of the two time points.

    Parameters
    ----------
    current, moved_prior
        ``(Z, Y, X)`` float32 intensities on the current grid (the prior resampled with the registration).
    current_cord, moved_cord
        ``(Z, Y, X)`` bool cords on the current grid; only voxels inside both (the current one eroded by
        ``rules.diff_erode_mm``) are looked at, and each image is divided by its cord median there.
    known
        ``(Z, Y, X)`` bool: where a current or prior lesion already is (dilated by the match tolerance);
        a component touching it is left to the lesion matching.
    spacing_zyx
        Voxel size (mm) of the current grid.

    Returns
    -------
    list of numpy.ndarray
        One ``(Z, Y, X)`` bool mask per new component of at least ``rules.diff_min_mm3``: voxels where the
        normalised difference rises by ``max(diff_min_rise, diff_k`` robust SDs) and the current image is
        brighter than its cord median by half that rise.
    """
    eroded = current_cord.copy()
    for _ in range(max(0, int(round(rules.diff_erode_mm / min(spacing_zyx[1:]))))):
        eroded = ndi.binary_erosion(eroded, structure=np.ones((1, 3, 3), bool))
    region = eroded & moved_cord & (moved_prior > 0)
    got = normalised_difference(current, moved_prior, region)
    if got is None:
        return []
    cur, pri, diff = got
    mad = 1.4826 * float(np.median(np.abs(diff[region] - np.median(diff[region]))))
    rise = max(rules.diff_min_rise, rules.diff_k * mad)
    cand = region & (diff > rise) & (cur > 1.0 + rise / 2)
    lab, n = ndi.label(cand, structure=_CONN26)
    voxel = float(np.prod(spacing_zyx))
    unexplained = ~shift_explained(cur, pri, diff - rise, cand, spacing_zyx, rules.diff_shift_mm)
    out = []
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() * voxel >= rules.diff_min_mm3 and not (comp & known).any() and (comp & unexplained).any():
            out.append(comp)
    return out


def shift_explained(cur: np.ndarray, pri: np.ndarray, excess: np.ndarray, where: np.ndarray,
                    spacing_zyx: tuple[float, float, float], shift_mm: float) -> np.ndarray:
    """Voxels of ``where`` whose rise a residual misregistration of ``shift_mm`` explains.

    To first order a shift by ``d`` mm changes an image by ``d`` times its gradient, so where the two images
    differ by less than ``shift_mm * max(|grad cur|, |grad pri|)`` (per mm, central differences with the
    voxel spacing) the difference may be the same edge seen a fraction of a voxel apart: the cord's rim
    against CSF on T2w, which a rigid registration on the cord cannot align to better than a voxel.

    Parameters
    ----------
    cur, pri
        ``(Z, Y, X)`` float: the current and the moved prior image, each divided by its cord median.
    excess
        ``(Z, Y, X)`` float: how far the difference rises beyond the subtraction's threshold.
    where
        ``(Z, Y, X)`` bool: the voxels to judge (the candidates); the gradient is computed on their bounding
        box with one voxel of margin.
    spacing_zyx
        Voxel size (mm).
    shift_mm
        The residual misregistration allowed (mm); 0 explains nothing.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` bool, True inside ``where`` where ``excess <= shift_mm * gradient``.
    """
    out = np.zeros(where.shape, dtype=bool)
    if not where.any() or shift_mm <= 0:
        return out
    idx = np.argwhere(where)
    box = tuple(slice(max(int(lo) - 1, 0), int(hi) + 2) for lo, hi in zip(idx.min(0), idx.max(0)))
    grad = np.zeros(out[box].shape, dtype=np.float32)
    for image in (cur[box], pri[box]):
        axes = [a for a in range(3) if image.shape[a] > 1]
        parts = np.gradient(image.astype(np.float32), *[spacing_zyx[a] for a in axes], axis=axes)
        parts = parts if isinstance(parts, list | tuple) else [parts]
        grad = np.maximum(grad, np.sqrt(sum(g * g for g in parts)))
    out[box] = where[box] & (excess[box] <= shift_mm * grad)
    return out


def csa_change(then: float | None, now: float | None) -> dict[str, Any]:
    """``{"then_mm2", "now_mm2", "change_pct"}`` (None where a value is missing)."""
    pct = None if not then or now is None else round(100.0 * (now - then) / then, 2)
    return {"then_mm2": then, "now_mm2": now, "change_pct": pct}


def with_error(change: dict[str, Any], error_pct: float) -> dict[str, Any]:
    """``change`` (a :func:`csa_change` dict) with its measurement error: ``error_pct`` (the scan-rescan RMS
    difference, %), ``smallest_real_change_pct`` (1.96 times it: the paired differences' 95 % limit) and
    ``beyond_error`` (True when ``|change_pct|`` exceeds that limit; None without a change)."""
    limit = round(1.96 * error_pct, 2)
    pct = change.get("change_pct")
    return {**change, "error_pct": error_pct, "smallest_real_change_pct": limit,
            "beyond_error": None if pct is None else abs(pct) > limit}
