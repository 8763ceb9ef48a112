"""``CompatUNet``: MONAI's ``UNet`` rebuilt from plain torch layers, for inference without importing MONAI.

``import monai`` loads every MONAI sub-package (and matplotlib through it): about a second of
``sci-node infer``'s cold start, spent on a network of a few dozen layers. This class has the
same modules under the same names as ``monai.networks.nets.UNet`` (default activation PReLU,
instance norm, ``"NDA"`` ordering, odd integer kernels), so a card's ``state_dict`` loads into it
unchanged and its outputs are those of the MONAI class (``tests/test_unet_compat.py``). A card
whose arguments leave that subset is built with MONAI as before (:func:`compatible`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["CompatUNet", "compatible"]

#: ``monai.networks.nets.UNet`` arguments this class reproduces (with their MONAI defaults).
_DEFAULTS: dict[str, Any] = {"kernel_size": 3, "up_kernel_size": 3, "num_res_units": 0, "act": "PRELU",
                             "norm": "INSTANCE", "dropout": 0.0, "bias": True, "adn_ordering": "NDA"}
_REQUIRED = ("spatial_dims", "in_channels", "out_channels", "channels", "strides")


def compatible(args: Mapping[str, Any]) -> bool:
    """Whether ``CompatUNet(**args)`` is the network ``monai.networks.nets.UNet(**args)`` builds."""
    if any(k not in _REQUIRED and k not in _DEFAULTS for k in args) or any(k not in args for k in _REQUIRED):
        return False
    a = {**_DEFAULTS, **args}
    if str(a["act"]).upper() != "PRELU" or str(a["norm"]).upper() != "INSTANCE" or a["adn_ordering"] != "NDA":
        return False
    kernels_ok = all(isinstance(a[k], int) and a[k] % 2 == 1 for k in ("kernel_size", "up_kernel_size"))
    chans, strides = list(a["channels"]), list(a["strides"])
    return (kernels_ok and int(a["spatial_dims"]) in (1, 2, 3) and len(chans) >= 2
            and len(strides) == len(chans) - 1 and all(isinstance(s, int) for s in strides)
            and isinstance(a["dropout"], (int, float)))


class _ADN(nn.Sequential):
    """MONAI ``ADN`` in ``"NDA"`` order: instance norm (no affine), dropout, PReLU."""

    def __init__(self, channels: int, dims: int, dropout: float) -> None:
        super().__init__()
        norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1]
        self.add_module("N", norm(channels))
        self.add_module("D", nn.Dropout(dropout))
        self.add_module("A", nn.PReLU())


class _Conv(nn.Sequential):
    """MONAI ``Convolution``: ``conv`` then ``adn`` (absent with ``conv_only``)."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int, kernel: int, dropout: float,
                 transposed: bool = False, conv_only: bool = False, bias: bool = True) -> None:
        super().__init__()
        pad = (kernel - 1) // 2
        if transposed:
            trans = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
            self.add_module("conv", trans(cin, cout, kernel, stride=stride, padding=pad, output_padding=stride - 1,
                                          bias=bias))
        else:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            self.add_module("conv", conv(cin, cout, kernel, stride=stride, padding=pad, bias=bias))
        if not conv_only:
            self.add_module("adn", _ADN(cout, dims, dropout))


class _Residual(nn.Module):
    """MONAI ``ResidualUnit``: ``conv`` (``unit0``, ``unit1`` ...) plus ``residual`` (a conv, or identity)."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int, kernel: int, subunits: int, dropout: float,
                 last_conv_only: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.residual: nn.Module = nn.Identity()
        n = max(1, subunits)
        for su in range(n):
            self.conv.add_module(f"unit{su:d}", _Conv(dims, cin if su == 0 else cout, cout, stride if su == 0 else 1,
                                                      kernel, dropout, conv_only=last_conv_only and su == n - 1,
                                                      bias=bias))
        if stride != 1 or cin != cout:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            k, p = (kernel, (kernel - 1) // 2) if stride != 1 else (1, 0)
            self.residual = conv(cin, cout, k, stride, p, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.residual(x)
        return self.conv(x) + res  # type: ignore[no-any-return]


class _Skip(nn.Module):
    """MONAI ``SkipConnection`` (``cat`` along channels)."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class CompatUNet(nn.Module):
    """``monai.networks.nets.UNet`` for the arguments :func:`compatible` accepts (same names, same maths).

    Parameters
    ----------
    spatial_dims, in_channels, out_channels, channels, strides, kernel_size, up_kernel_size, num_res_units, \
dropout, bias
        As MONAI's; ``act``, ``norm`` and ``adn_ordering`` are accepted at their defaults only.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[int], kernel_size: int = 3, up_kernel_size: int = 3, num_res_units: int = 0,
                 act: str = "PRELU", norm: str = "INSTANCE", dropout: float = 0.0, bias: bool = True,
                 adn_ordering: str = "NDA") -> None:
        super().__init__()
        if not compatible({"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
                           "channels": channels, "strides": strides, "kernel_size": kernel_size,
                           "up_kernel_size": up_kernel_size, "act": act, "norm": norm, "dropout": dropout,
                           "adn_ordering": adn_ordering}):
            raise ValueError("CompatUNet: arguments outside the reproduced subset of monai.networks.nets.UNet")
        self._d, self._k, self._uk = int(spatial_dims), int(kernel_size), int(up_kernel_size)
        self._res, self._drop, self._bias = int(num_res_units), float(dropout), bool(bias)
        self.model = self._block(in_channels, out_channels, list(channels), list(strides), True)

    def _down(self, cin: int, cout: int, stride: int) -> nn.Module:
        if self._res > 0:
            return _Residual(self._d, cin, cout, stride, self._k, self._res, self._drop, bias=self._bias)
        return _Conv(self._d, cin, cout, stride, self._k, self._drop, bias=self._bias)

    def _up(self, cin: int, cout: int, stride: int, is_top: bool) -> nn.Module:
        conv = _Conv(self._d, cin, cout, stride, self._uk, self._drop, transposed=True,
                     conv_only=is_top and self._res == 0, bias=self._bias)
        if self._res == 0:
            return conv
        ru = _Residual(self._d, cout, cout, 1, self._k, 1, self._drop, last_conv_only=is_top, bias=self._bias)
        return nn.Sequential(conv, ru)

    def _block(self, cin: int, cout: int, channels: list[int], strides: list[int], is_top: bool) -> nn.Module:
        c, s = channels[0], strides[0]
        if len(channels) > 2:
            sub, upc = self._block(c, c, channels[1:], strides[1:], False), c * 2
        else:
            sub, upc = self._down(c, channels[1], 1), c + channels[1]
        return nn.Sequential(self._down(cin, c, s), _Skip(sub), self._up(upc, cout, s, is_top))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``."""
        return self.model(x)  # type: ignore[no-any-return]
