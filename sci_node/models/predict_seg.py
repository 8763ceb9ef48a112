"""Segmentation inference: a model artefact + :mod:`sci_node.imaging.preprocess` → a mask on the source grid.

:class:`Segmenter` is what the pipeline calls; :func:`infer_volume` is the model-grid core
the trainer also uses for validation, so training-time scores come from the same code.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import SimpleITK as sitk

from sci_node.errors import InvalidSeriesError, ModelError
from sci_node.imaging import postprocess, preprocess
from sci_node.models.artifact import load_network

if TYPE_CHECKING:
    import torch

#: A network, or a wrapper around one: ``(B, C, Y, X)`` windows -> ``(B, 1, Y, X)`` logits.
Predictor = Callable[["torch.Tensor"], "torch.Tensor"]


def infer_volume(net: "torch.nn.Module", array: np.ndarray, spec: preprocess.PrepSpec, device: str = "cpu",
                 batch_slices: int = 16, z_spacing: float = 1.0, keep: np.ndarray | None = None) -> np.ndarray:
    """Foreground probability of every axial slice of a model-grid volume.

    Parameters
    ----------
    net : torch.nn.Module
        2-D network, ``spec.in_channels`` input channels, 1 output channel (logits).
    array : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised model-grid intensities.
    spec : PrepSpec
        Gives ``patch_yx`` (sliding-window ROI), ``context``, ``thickness_channel``,
        ``flip_x_tta`` (mean of the logits of each slice and of its left-right mirror) and
        ``ensemble_cascade_below`` (for a :class:`~sci_node.nets.LogitMeanEnsemble` ``net``: the
        members after the first run only where the first member's probability exceeds it; the
        logits there are the exact ensemble mean, elsewhere the first member's).
    z_spacing : float
        Slice spacing (mm) of ``array``; read only with ``spec.thickness_channel``.
    keep : numpy.ndarray | None
        ``(Z, Y, X)`` mask of the voxels whose probability is used (the dilated cord, for the
        lesion model): a sliding window holding none of them is not run. Every window that
        covers a kept voxel is, so the probabilities there are exactly those of the full run;
        elsewhere they are meaningless (about 0), for callers that multiply by ``keep``.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` float32 probabilities in [0, 1].
    """
    import torch

    from sci_node.nets import LogitMeanEnsemble

    stacked, inner = preprocess.pad_to(preprocess.with_context(array, spec.context), spec.patch_yx)
    if spec.thickness_channel:
        thick = np.full((stacked.shape[0], 1, *stacked.shape[2:]), preprocess.thickness_value(z_spacing), np.float32)
        stacked = np.concatenate([stacked, thick], axis=1)
    cut = spec.ensemble_cascade_below
    if cut is None or not isinstance(net, LogitMeanEnsemble) or len(net.members) < 2:
        logits = _infer_logits(net, stacked, inner, spec, device, batch_slices, keep)
    else:
        first, rest = net.first_and_rest()
        logits = _infer_logits(first, stacked, inner, spec, device, batch_slices, keep)
        unsure = logits > np.float32(np.log(cut / (1.0 - cut)))
        if keep is not None:
            unsure &= keep.astype(bool)
        if unsure.any():  # every window over an unsure voxel runs: the mean there is exact
            others = _infer_logits(rest, stacked, inner, spec, device, batch_slices, unsure)
            n = len(net.members)
            logits = np.where(unsure, (logits + (n - 1) * others) / n, logits).astype(np.float32)
    return torch.sigmoid(torch.from_numpy(logits)).numpy()


def _infer_logits(net: "torch.nn.Module", stacked: np.ndarray, inner: tuple[slice, slice],
                  spec: preprocess.PrepSpec, device: str, batch_slices: int,
                  keep: np.ndarray | None) -> np.ndarray:
    """``(Z, Y, X)`` float32 logits of ``net`` on padded ``(Z, C, Y', X')`` slices ``stacked``
    (``inner`` crops the padding back off); windows without a ``keep`` voxel are not run."""
    import torch

    predictor: Predictor = _flip_x_mean(net) if spec.flip_x_tta else net
    if keep is not None:  # the mask rides along as a last channel that the predictor strips
        stacked = np.concatenate([stacked, preprocess.pad_to(keep[:, None].astype(np.float32), spec.patch_yx)[0]],
                                 axis=1)
        predictor = _skip_empty(predictor)
    out = np.zeros((stacked.shape[0], inner[0].stop - inner[0].start, inner[1].stop - inner[1].start), np.float32)
    with torch.inference_mode():
        for z0 in range(0, stacked.shape[0], batch_slices):
            x = torch.from_numpy(np.ascontiguousarray(stacked[z0:z0 + batch_slices])).float().to(device)
            # 64 windows per forward pass: sw_batch_size=16 was ~3x slower on 2 CPU cores
            logits = sliding_window(x, spec.patch_yx, 64, predictor, spec.sw_overlap)
            out[z0:z0 + batch_slices] = logits[:, 0].cpu().numpy()[:, inner[0], inner[1]]  # type: ignore[index, call-overload]
    return out


def _window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window origins along one axis of ``size >= roi`` (MONAI's ``dense_patch_slices``: step
    ``int(roi * (1 - overlap))``, at least 1; the last window ends on the border)."""
    step = roi if roi == size else max(1, int(roi * (1 - overlap)))
    n = next((d for d in range(int(np.ceil(size / step))) if d * step + roi >= size), 0) + 1
    return [i * step - max(i * step + roi - size, 0) for i in range(n)]


def _gaussian_weights(roi: tuple[int, int]) -> "torch.Tensor":
    """MONAI's ``compute_importance_map(roi, "gaussian", sigma_scale=0.125)``: ``(1, 1, Y, X)``."""
    import torch

    w: "torch.Tensor | None" = None
    for i, n in enumerate(roi):
        x = torch.arange(start=-(n - 1) / 2.0, end=(n - 1) / 2.0 + 1, dtype=torch.float)
        x = torch.exp(x ** 2 / (-2 * (n * 0.125) ** 2))
        w = x if w is None else w.unsqueeze(-1) * x[(None,) * i]
    assert w is not None
    return torch.clamp(w, min=max(float(w.min()), 1e-3))[None, None]


def sliding_window(x: "torch.Tensor", roi: tuple[int, int], sw_batch: int, predictor: Predictor,
                   overlap: float) -> "torch.Tensor":
    """Gaussian-blended sliding-window logits of ``(B, C, Y, X)`` slices at least ``roi`` in size.

    The same windows, batches, weights and summation order as MONAI's
    ``sliding_window_inference(x, roi, sw_batch, predictor, overlap, mode="gaussian")``, so the
    same numbers (``tests/test_segmenter.py``), without importing MONAI at inference.

    Returns
    -------
    torch.Tensor
        ``(B, K, Y, X)`` float32, ``K`` the predictor's output channels.
    """
    import torch

    b, _, yn, xn = x.shape
    if yn < roi[0] or xn < roi[1]:
        raise ValueError(f"slices {yn}x{xn} are smaller than the window {roi}; pad them first")
    wins = [(y, xx) for y in _window_starts(yn, roi[0], overlap) for xx in _window_starts(xn, roi[1], overlap)]
    weight = _gaussian_weights(roi).to(x.device)
    count = torch.zeros((1, 1, yn, xn), dtype=x.dtype, device=x.device)
    for y, xx in wins:
        count[:, :, y:y + roi[0], xx:xx + roi[1]] += weight
    out: "torch.Tensor | None" = None
    idx = [(k // len(wins), *wins[k % len(wins)]) for k in range(b * len(wins))]
    for g in range(0, len(idx), sw_batch):
        chunk = idx[g:g + sw_batch]
        pred = predictor(torch.cat([x[i:i + 1, :, y:y + roi[0], xx:xx + roi[1]] for i, y, xx in chunk])) * weight
        if out is None:
            out = torch.zeros((b, pred.shape[1], yn, xn), dtype=x.dtype, device=x.device)
        for p, (i, y, xx) in zip(pred, chunk):
            out[i, :, y:y + roi[0], xx:xx + roi[1]] += p
    assert out is not None
    return out / count


def coarse_to_fine(infer: Callable[[np.ndarray], np.ndarray], array: np.ndarray, spacing: tuple[float, float, float],
                   spec: preprocess.PrepSpec, step_mm: float, margin_mm: float, threshold: float) -> np.ndarray:
    """Find the cord coarsely, then segment at full resolution only around it.

    The network first runs on every slice ``step_mm`` apart (same in-plane resolution: the
    network only knows that scale). Each slice is then segmented in a strip that follows the
    cord: the box of what the coarse pass marks on the two coarse slices around it, plus
    ``margin_mm`` (trimmed, to no less than half of it a side, when that saves a sliding
    window), the same size on every slice. A full-FOV sagittal (canonical axial grid 216 x 480
    x 65 at 0.8 mm) runs one window per slice instead of three (the box of the whole track) or
    ten. Where the track sweeps across the field by no more than half a window (axial series:
    the cord stays put), and for networks that read neighbouring slices (``spec.context``, whose
    neighbours must stay aligned), every slice gets the box of the whole track plus the margin.
    Fields of view at most twice the patch in each in-plane axis, or a coarse pass that finds
    nothing, run the plain full-volume inference. An in-plane axis a few voxels (at most an
    eighth of the patch) longer than a multiple of the patch loses them on the coarse pass
    (centred crop): 65 -> 64 halves its windows.

    Parameters
    ----------
    infer : callable
        ``(Z', Y', X') float32 -> (Z', Y', X') float32`` probabilities (:func:`infer_volume`).
    array : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised model-grid intensities; spacing ``(sz, sy, sx)`` mm.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` float32 probabilities, zero outside the strips.
    """
    zn, yn, xn = array.shape
    py, px = spec.patch_yx
    if yn <= 2 * py and xn <= 2 * px:
        return infer(array)
    k = max(1, int(round(step_mm / max(spacing[0], 1e-3))))
    zs = np.arange(min(k // 2, zn - 1), zn, k)
    (cy, ey), (cx, ex) = _coarse_crop(yn, py), _coarse_crop(xn, px)
    rough = infer(np.ascontiguousarray(array[zs, cy:yn - ey, cx:xn - ex])) >= threshold
    track = _track(rough, spacing)
    if track is None or not track[1].any():
        return infer(array)
    boxes, kept = track
    boxes = boxes + np.array([cy, cy, cx, cx])
    my, mx = int(np.ceil(margin_mm / spacing[1])), int(np.ceil(margin_mm / spacing[2]))
    per_z = _boxes_per_slice(boxes[kept], zs[kept], zn)
    b = boxes[kept]
    sweep = max(int(b[:, 1].max() - b[:, 0].min() - (per_z[:, 1] - per_z[:, 0]).max()),
                int(b[:, 3].max() - b[:, 2].min() - (per_z[:, 3] - per_z[:, 2]).max()))
    if spec.context > 0 or sweep <= min(py, px) // 2:  # the track's box is already near the cord
        y0, y1 = max(0, int(b[:, 0].min()) - my), min(yn, int(b[:, 1].max()) + 1 + my)
        x0, x1 = max(0, int(b[:, 2].min()) - mx), min(xn, int(b[:, 3].max()) + 1 + mx)
        out = np.zeros(array.shape, np.float32)
        out[:, y0:y1, x0:x1] = infer(np.ascontiguousarray(array[:, y0:y1, x0:x1]))
        return out
    return _fine_strips(infer, array, per_z, (my, mx), spec.patch_yx)


def _fine_strips(infer: Callable[[np.ndarray], np.ndarray], array: np.ndarray, per_z: np.ndarray,
                 margin: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    """:func:`coarse_to_fine`'s fine pass along the track: ``infer`` on one strip a slice, centred on
    that slice's box ``per_z[z]`` (``(y0, y1, x0, x1)``), all of one size (:func:`_strip_size`)."""
    zn, yn, xn = array.shape
    hy = _strip_size(int((per_z[:, 1] - per_z[:, 0]).max()) + 1, margin[0], patch[0], yn)
    hx = _strip_size(int((per_z[:, 3] - per_z[:, 2]).max()) + 1, margin[1], patch[1], xn)
    ys = np.clip((per_z[:, 0] + per_z[:, 1] + 1) // 2 - hy // 2, 0, yn - hy)
    xs = np.clip((per_z[:, 2] + per_z[:, 3] + 1) // 2 - hx // 2, 0, xn - hx)
    prob = infer(np.stack([array[z, ys[z]:ys[z] + hy, xs[z]:xs[z] + hx] for z in range(zn)]))
    out = np.zeros(array.shape, np.float32)
    for z in range(zn):
        out[z, ys[z]:ys[z] + hy, xs[z]:xs[z] + hx] = prob[z]
    return out


def _coarse_crop(size: int, patch: int) -> tuple[int, int]:
    """Voxels cut from the start and the end of an axis for the coarse pass: none, or the excess over
    a multiple of ``patch`` split between the ends when it is at most ``patch // 8``."""
    excess = size % patch
    if size > patch and 0 < excess <= patch // 8:
        return excess // 2, excess - excess // 2
    return 0, 0


def _strip_size(extent: int, margin: int, patch: int, size: int) -> int:
    """Strip width: ``extent`` plus ``margin`` a side, trimmed to ``patch`` (one window) when half the
    margin a side still fits in it; at most ``size``."""
    want = extent + 2 * margin
    if want > patch and extent + margin <= patch:
        want = patch
    return min(size, want)


def _boxes_per_slice(boxes: np.ndarray, zc: np.ndarray, zn: int) -> np.ndarray:
    """``(zn, 4)`` in-plane boxes ``(y0, y1, x0, x1)`` (inclusive) of every slice: the union of the
    boxes of the coarse slices ``zc`` (sorted) either side of it, the nearest one beyond the ends."""
    z = np.arange(zn)
    hi = np.clip(np.searchsorted(zc, z), 0, len(zc) - 1)
    lo = np.clip(np.searchsorted(zc, z, side="right") - 1, 0, len(zc) - 1)
    a, b = boxes[lo], boxes[hi]
    return np.stack([np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1]),
                     np.minimum(a[:, 2], b[:, 2]), np.maximum(a[:, 3], b[:, 3])], axis=1).astype(np.int64)


def _track(coarse: np.ndarray, spacing: tuple[float, float, float],
           max_offset_mm: float = 30.0) -> tuple[np.ndarray, np.ndarray] | None:
    """The cord's track in a coarse ``(Z', Y, X)`` mask: ``(boxes, kept)``.

    Per slice the largest 2-D component stands for the cord: ``boxes`` ``(Z', 4)`` holds its
    ``(y0, y1, x0, x1)`` (inclusive; -1 where a slice has none). Slices whose component centre
    lies more than ``max_offset_mm`` from the running median of the centres (5 coarse slices:
    the cord curves, a blob at the field's edge that outgrew a faint cord jumps) are not
    ``kept``, nor slices without a component. ``None`` when no slice has a component.
    """
    from scipy import ndimage as ndi

    boxes = np.full((coarse.shape[0], 4), -1, np.int64)
    centres = np.full((coarse.shape[0], 2), np.nan)
    for i, sl in enumerate(coarse):
        lab, n = ndi.label(sl)
        if n == 0:
            continue
        big = int(np.argmax(ndi.sum_labels(sl, lab, index=np.arange(1, n + 1)))) + 1
        ys, xs = np.nonzero(lab == big)
        boxes[i] = (ys.min(), ys.max(), xs.min(), xs.max())
        centres[i] = (ys.mean() * spacing[1], xs.mean() * spacing[2])
    found = np.nonzero(boxes[:, 0] >= 0)[0]
    if found.size == 0:
        return None
    c = centres[found]
    med = np.stack([np.median(c[max(0, i - 2):i + 3], axis=0) for i in range(len(c))])
    kept = np.zeros(coarse.shape[0], bool)
    kept[found[np.hypot(*(c - med).T) <= max_offset_mm]] = True
    return boxes, kept


def _skip_empty(predict: Predictor) -> Predictor:
    """A predictor for ``(B, C+1, Y, X)`` windows whose last channel is a keep-mask: ``predict``
    runs on the first ``C`` channels of the windows holding a kept voxel; the others get logits
    of -20 (probability ~2e-9) without running the network."""
    import torch

    def run(x: "torch.Tensor") -> "torch.Tensor":
        inp, busy = x[:, :-1], x[:, -1].flatten(1).amax(1) > 0
        if bool(busy.all()):
            return predict(inp)
        out = torch.full((x.shape[0], 1, *x.shape[2:]), -20.0, dtype=x.dtype, device=x.device)
        if bool(busy.any()):
            out[busy] = predict(inp[busy])
        return out
    return run


def _flip_x_mean(net: "torch.nn.Module") -> Predictor:
    """A predictor returning the mean logits of a ``(B, C, Y, X)`` batch and of its X mirror."""
    import torch

    def predict(x: "torch.Tensor") -> "torch.Tensor":
        y = net(torch.cat([x, torch.flip(x, (3,))]))  # one forward pass: fewer, fuller batches on a CPU
        return 0.5 * (y[:x.shape[0]] + torch.flip(y[x.shape[0]:], (3,)))
    return predict


def roi_dilate_mm(post: Mapping[str, Any]) -> float:
    """How far (mm) the ROI (the cord, for the lesion model) is dilated: the card's
    ``postprocessing.roi_dilate_mm``, 2 mm when absent. The trainer reads it here too, so the
    mask it trains and validates with is the one inference applies."""
    return float(post.get("roi_dilate_mm", 2.0))


def output_roi_mm(post: Mapping[str, Any]) -> float | None:
    """How far (mm) beyond the ROI a prediction may reach on the **source grid**: the card's
    ``postprocessing.output_roi_mm`` (0 = inside the ROI itself: lesions are intramedullary, so
    nothing outside the cord mask is a lesion); ``None`` when absent (only the model-grid
    restriction to the ROI dilated by :func:`roi_dilate_mm` applies)."""
    v = post.get("output_roi_mm")
    return None if v is None else float(v)


def roi_input(array: np.ndarray, roi: np.ndarray, post: Mapping[str, Any]) -> np.ndarray:
    """What a ROI model (the lesion model) is fed, in training and at inference alike.

    Parameters
    ----------
    array : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised model-grid intensities.
    roi : numpy.ndarray
        ``(Z, Y, X)`` uint8 ROI on the same grid, already dilated by :func:`roi_dilate_mm`.
    post : Mapping
        The card's ``postprocessing``: ``mask_input_to_roi`` zeroes everything outside the ROI;
        ``roi_normalise = "median"`` then divides by the median intensity inside the ROI (the
        cord's own level = 1, so "brighter than this cord" means the same on every contrast and
        scanner) and clips to ``[0, roi_clip_max]`` (default 4); ``roi_normalise = "percentile"``
        divides by the ``roi_normalise_percentile`` (default 50) instead, for a ROI dilated so far
        that its CSF rim would pull the median up.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` float32.
    """
    if not post.get("mask_input_to_roi"):
        return array
    out = (array * (roi > 0)).astype(np.float32)
    norm = post.get("roi_normalise")
    if norm in ("median", "percentile") and roi.any():
        q = 50.0 if norm == "median" else float(post.get("roi_normalise_percentile", 50.0))
        level = max(float(np.percentile(out[roi > 0], q)), 1e-3)
        out = np.clip(out / level, 0.0, float(post.get("roi_clip_max", 4.0))).astype(np.float32)
    return out


def configure_threads(requested: int, workers: int = 1) -> int:
    """Set torch's intra-op thread count once per process; return it.

    Parameters
    ----------
    requested : int
        Threads wanted; 0 = auto: the CPUs this process may run on, minus one left for the
        DICOM server and the OS, divided among ``workers``, at least 1.
    workers : int
        Worker threads that run inference concurrently in this process.
    """
    import os

    import torch

    if requested > 0:
        n = requested
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, (cpus - 1) // max(1, workers))
    torch.set_num_threads(n)
    return n


class Segmenter:
    """One segmentation model ready to predict.

    Attributes
    ----------
    name, version : str
        From the card (``cord`` / ``lesion``, ``0.1.0`` ...).
    card : dict
        The full model card.
    """

    def __init__(self, net: "torch.nn.Module", card: dict[str, Any], device: str = "cpu") -> None:
        self.net = net
        self.card = card
        self.name = str(card["name"])
        self.version = str(card["version"])
        self.device = device
        try:
            self.spec = preprocess.PrepSpec.from_card(card["preprocessing"])
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ModelError(f"model {self.name} {self.version}: bad preprocessing in card: {exc}") from None
        in_ch = card.get("architecture", {}).get("args", {}).get("in_channels")
        if in_ch is not None and int(in_ch) != self.spec.in_channels:
            raise ModelError(f"model {self.name} {self.version}: the network takes {in_ch} input channels, but its "
                             f"preprocessing feeds {self.spec.in_channels}")
        self.post: dict[str, Any] = dict(card.get("postprocessing", {}))

    @classmethod
    def from_artifact(cls, art_dir: Path, device: str = "cpu") -> "Segmenter":
        """Load ``art_dir`` (verified checksum, ``weights_only=True``)."""
        net, card = load_network(Path(art_dir), device=device)
        if card.get("kind") != "segmentation":
            raise ModelError(f"model artefact {str(art_dir)!r} is a {card.get('kind')!r}, not a segmentation model")
        return cls(net, card, device)

    def _roi_box(self, prepared: preprocess.Prepared, roi: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...] | None]:
        ref = preprocess.source_reference(prepared.source)
        if tuple(roi.shape) != tuple(ref.GetSize()[::-1]):
            raise ModelError(f"roi shape {roi.shape} does not match the image's (Z,Y,X) {ref.GetSize()[::-1]}")
        roi_img = sitk.GetImageFromArray(roi.astype(np.uint8))
        roi_img.CopyInformation(ref)
        roi_m = preprocess.mask_to_model_grid(roi_img, prepared.grid)
        sz, sy, sx = prepared.grid.GetSpacing()[::-1]
        roi_m = postprocess.dilate_mm(roi_m, (sz, sy, sx), roi_dilate_mm(self.post))
        margin_mm = float(self.post.get("roi_margin_mm", 16.0))
        box = preprocess.roi_bbox(roi_m, (0, int(margin_mm / sy), int(margin_mm / sx)))
        return roi_m, box

    def predict_prob_model_grid(self, prepared: preprocess.Prepared, roi: np.ndarray | None = None) -> np.ndarray:
        """``(Z, Y, X)`` float32 probabilities on ``prepared.grid`` (zero outside the ROI).

        Without a ROI and with the card's ``postprocessing.coarse_step_mm`` set, large fields
        of view are segmented coarse-to-fine (:func:`coarse_to_fine`).
        """
        z_spacing = float(prepared.grid.GetSpacing()[2])
        if roi is None:
            step = float(self.post.get("coarse_step_mm", 0.0))
            if step > 0:
                sz, sy, sx = (float(v) for v in prepared.grid.GetSpacing()[::-1])
                return coarse_to_fine(lambda a: infer_volume(self.net, a, self.spec, self.device, z_spacing=z_spacing),
                                      prepared.array, (sz, sy, sx), self.spec, step,
                                      float(self.post.get("coarse_margin_mm", 20.0)), self.spec.threshold)
            return infer_volume(self.net, prepared.array, self.spec, self.device, z_spacing=z_spacing)
        roi_m, box = self._roi_box(prepared, roi)
        if box is None:
            return np.zeros(prepared.array.shape, np.float32)
        keep = preprocess.crop(roi_m, box)
        array = roi_input(preprocess.crop(prepared.array, box), keep, self.post)
        prob = infer_volume(self.net, array, self.spec, self.device, z_spacing=z_spacing, keep=keep)
        return preprocess.paste(prob, box, prepared.array.shape) * roi_m

    def predict(self, image: sitk.Image, roi: np.ndarray | None = None) -> np.ndarray:
        """Segment ``image``; return a uint8 ``(Z, Y, X)`` mask on ``image``'s own grid.

        Parameters
        ----------
        image : SimpleITK.Image
            3-D MR image in patient LPS, any orientation (sagittal, axial ...).
        roi : numpy.ndarray | None
            ``(Z, Y, X)`` mask on ``image``'s grid (the cord for the lesion model): the
            model only looks at a box around it and only keeps voxels in the dilated ROI.
        """
        prepared, prob = self._prob(image, roi)
        return self.finish(prob, prepared, roi=roi)

    def predict_with_probability(self, image: sitk.Image, roi: np.ndarray | None = None
                                 ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict`'s mask and the network's probability behind it, both on ``image``'s grid.

        Returns
        -------
        tuple
            ``(mask, prob)``: uint8 and float32 ``(Z, Y, X)`` arrays on ``image``'s grid; ``prob``
            in [0, 1] is the model-grid probability resampled linearly (what a lesion's
            confidence is read from, :func:`sci_node.measure.lesion_table`).
        """
        prepared, prob = self._prob(image, roi)
        return self.finish(prob, prepared, roi=roi), preprocess.to_source_grid(prob, prepared, threshold=None)

    def _prob(self, image: sitk.Image, roi: np.ndarray | None) -> tuple[preprocess.Prepared, np.ndarray]:
        """``(prepared, model-grid probability)`` of a 3-D (or 4-D: first volume) image."""
        if image.GetDimension() not in (3, 4) or min(image.GetSize()[:3]) < 1:
            raise InvalidSeriesError(f"cannot segment a {image.GetDimension()}-D image of size {image.GetSize()}")
        prepared = preprocess.prepare(image, self.spec)
        return prepared, self.predict_prob_model_grid(prepared, roi)

    def finish(self, prob: np.ndarray, prepared: preprocess.Prepared, threshold: float | None = None,
               roi: np.ndarray | None = None, min_volume_mm3: float | None = None, grow: bool = True) -> np.ndarray:
        """Model-grid probabilities → post-processed uint8 mask on the source grid.

        Parameters
        ----------
        prob : numpy.ndarray
            ``(Z, Y, X)`` float32 probabilities on ``prepared.grid``.
        threshold : float | None
            Foreground threshold; ``None`` uses the card's (``preprocessing.threshold``). The
            trainer passes a grid of values to calibrate it on the validation folds.
        roi : numpy.ndarray | None
            ``(Z, Y, X)`` mask on the source grid (the cord, for the lesion model); with the
            card's ``output_roi_mm`` set, the mask is cut to it dilated by that many mm.
        min_volume_mm3 : float | None
            Smallest component kept; ``None`` uses the card's (``postprocessing.min_volume_mm3``).
        grow : bool
            Apply :meth:`grow` (the card's ``grow_threshold``) last; the trainer turns it off to
            cache the thresholded mask.
        """
        thr = self.spec.threshold if threshold is None else float(threshold)
        max_dist = float(self.post.get("max_centerline_distance_mm", 0.0))
        max_gap = float(self.post.get("max_gap_below_mm", 0.0))
        conus_mm = float(self.post.get("conus_window_mm", 0.0))
        if max_dist > 0 or max_gap > 0 or conus_mm > 0:  # on the canonical axial grid (Z along the cord)
            sz, sy, sx = prepared.grid.GetSpacing()[::-1]
            keep = postprocess.near_centerline(prob >= thr, (sz, sy, sx), max_dist)
            if max_gap > 0 or conus_mm > 0:  # specks in a gap (dropped by the size limit anyway) must not bridge it
                keep = postprocess.keep_components(keep, (sz, sy, sx),
                                                   min_volume_mm3=float(self.post.get("min_volume_mm3", 0.0)))
                keep = postprocess.drop_detached_below(keep, (sz, sy, sx), max_gap)
                keep = postprocess.cut_below_conus(keep, (sz, sy, sx), window_mm=conus_mm)
            prob = prob * keep
        spacing = tuple(float(s) for s in prepared.source.GetSpacing()[:3][::-1])
        mask = self._source_mask(prob, prepared, thr, roi)
        kept = self.keep_components(mask, spacing, min_volume_mm3)  # type: ignore[arg-type]
        return self.grow(kept, prob, prepared, roi) if grow else kept

    def _source_mask(self, prob: np.ndarray, prepared: preprocess.Prepared, threshold: float,
                     roi: np.ndarray | None) -> np.ndarray:
        """``prob >= threshold`` on the source grid, cut to ``roi`` dilated by the card's ``output_roi_mm``."""
        mask = preprocess.to_source_grid(prob, prepared, threshold=threshold)
        keep_mm = output_roi_mm(self.post)
        if roi is not None and keep_mm is not None:
            spacing = tuple(float(s) for s in prepared.source.GetSpacing()[:3][::-1])
            mask = mask * postprocess.dilate_mm(roi, spacing, keep_mm)  # type: ignore[arg-type]
        return mask

    def grow_region(self, prob: np.ndarray, prepared: preprocess.Prepared, roi: np.ndarray | None = None,
                    low: float | None = None) -> np.ndarray | None:
        """Source-grid voxels at or above ``low`` (default ``postprocessing.grow_threshold``), cut like the
        mask; None when off (0)."""
        low = float(self.post.get("grow_threshold", 0.0)) if low is None else float(low)
        return self._source_mask(prob, prepared, low, roi) if low > 0 else None

    def grow(self, mask: np.ndarray, prob: np.ndarray, prepared: preprocess.Prepared,
             roi: np.ndarray | None = None, region: np.ndarray | None = None) -> np.ndarray:
        """Hysteresis after the size limit: each kept component extends into the connected voxels whose
        probability is at least ``postprocessing.grow_threshold`` (lesions: the threshold and the smallest
        lesion decide *whether* there is a lesion, the lower threshold how far it reaches). Off (the mask
        unchanged) without that key. ``region`` = a cached :meth:`grow_region`."""
        if region is None:
            region = self.grow_region(prob, prepared, roi)
        return mask if region is None else postprocess.hysteresis(mask, region)

    def keep_components(self, mask: np.ndarray, spacing: tuple[float, float, float],
                        min_volume_mm3: float | None = None) -> np.ndarray:
        """The last step of :meth:`finish`: drop components below the card's size limits.

        Parameters
        ----------
        mask : numpy.ndarray
            ``(Z, Y, X)`` uint8 mask on the source grid, spacing ``(sz, sy, sx)`` in mm.
        min_volume_mm3 : float | None
            Smallest component kept; ``None`` uses the card's (``postprocessing.min_volume_mm3``).
        """
        return postprocess.keep_components(
            mask, spacing,
            min_volume_mm3=float(self.post.get("min_volume_mm3", 0.0) if min_volume_mm3 is None else min_volume_mm3),
            min_fraction_of_largest=float(self.post.get("min_fraction_of_largest", 0.0)))
