"""The MONAI-free inference path gives MONAI's numbers: U-Net, sliding window, and SciPy's peak finder."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sci_node.imaging.levels import find_peaks
from sci_node.models.predict_seg import sliding_window
from sci_node.nets.unet import CompatUNet, compatible

UNET_ARGS: list[dict[str, Any]] = [
    {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
     "num_res_units": 1, "dropout": 0.0},  # the cord and lesion cards
    {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "channels": [8, 16, 32], "strides": [2, 2]},
    {"spatial_dims": 2, "in_channels": 2, "out_channels": 1, "channels": [8, 16, 32], "strides": [2, 1],
     "num_res_units": 2, "dropout": 0.1},
    {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [4, 8, 16], "strides": [2, 2],
     "num_res_units": 1},
]


@pytest.mark.parametrize("args", UNET_ARGS)
def test_compat_unet_is_monais(args: dict[str, Any]) -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    ref = UNet(**args).eval()
    ours = CompatUNet(**args).eval()
    assert compatible(args)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, args["in_channels"], *([32] * args["spatial_dims"]))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_other_unet_arguments_fall_back_to_monai() -> None:
    base = UNET_ARGS[0]
    assert not compatible({**base, "act": "RELU"})
    assert not compatible({**base, "kernel_size": [3, 3]})
    assert not compatible({**base, "norm": "BATCH"})
    assert not compatible({k: v for k, v in base.items() if k != "strides"})


@pytest.mark.parametrize("shape,overlap", [((5, 1, 97, 130), 0.25), ((3, 1, 64, 64), 0.25),
                                           ((20, 1, 70, 200), 0.5), ((2, 1, 64, 71), 0.0)])
def test_sliding_window_is_monais(shape: tuple[int, ...], overlap: float) -> None:
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = CompatUNet(2, 1, 1, [8, 16, 32], [2, 2], num_res_units=1).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = sliding_window_inference(x, (64, 64), 64, net, overlap=overlap, mode="gaussian")
        assert torch.equal(sliding_window(x, (64, 64), 64, net, overlap), ref)


def test_find_peaks_is_scipys() -> None:
    from scipy.signal import find_peaks as scipy_find_peaks

    rng = np.random.default_rng(0)
    for t in range(600):
        n = int(rng.integers(1, 300))
        x = rng.normal(size=n).cumsum() * 0.1 if t % 2 else rng.random(n)
        if t % 3 == 0:
            x = np.round(x, 1)  # plateaus and ties
        d, prom = int(rng.integers(1, 12)), float(rng.choice([0.0, 0.05, 0.15, 0.3]))
        np.testing.assert_array_equal(find_peaks(x, distance=d, prominence=prom),
                                      scipy_find_peaks(x, distance=d, prominence=prom)[0])


def test_coarse_to_fine_follows_a_track_that_sweeps_across_the_field() -> None:
    """A cord crossing 300 px of a 400-px field: one 64 x 64 strip a slice, every cord voxel inside one."""
    from pathlib import Path

    from sci_node.models.predict_seg import Segmenter, coarse_to_fine

    spec = Segmenter.from_artifact(Path(__file__).resolve().parents[1] / "models" / "cord" / "0.2.3").spec
    vol = np.zeros((200, 400, 65), np.float32)
    for z in range(200):
        y = 30 + int(1.5 * z)
        vol[z, y:y + 10, 28:38] = 1.0
    calls: list[tuple[int, ...]] = []

    def infer(a: np.ndarray) -> np.ndarray:  # a voxel-wise "network": equal to the full run wherever it runs
        calls.append(a.shape)
        return (a > 0.5).astype(np.float32)

    out = coarse_to_fine(infer, vol, (1.0, 0.8, 0.8), spec, 8.0, 20.0, 0.5)
    assert calls == [(25, 400, 64), (200, 64, 60)]  # coarse: 65 -> 64 columns; fine: one window a slice
    np.testing.assert_array_equal(out, vol)
