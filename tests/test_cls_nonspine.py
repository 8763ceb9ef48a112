"""Extra synthetic non-spine exams of the anatomy classifier (``trainer.classify.nonspine``, ``[data] n_nonspine``)."""
from __future__ import annotations

import numpy as np
import pytest

from sci_node.errors import ConfigError
from sci_node.routing.cls_features import N_FEATURES, THUMB_SIZE, series_inputs
from trainer.classify.data import ANATOMY, TASKS, SampleSet
from trainer.classify.nonspine import KINDS, epi_artefacts
from trainer.classify.train import EXTRA_DATA_KEYS, _with_nonspine

EXPECTED = {"brain_epi": "brain", "brain_crop": "brain", "phantom_scan": "other", "ct_crop": "abdomen",
            "abdomen_slice": "abdomen"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_gives_a_finite_sample_of_its_anatomy(kind: str) -> None:
    rng = np.random.default_rng(3)
    img, hdr, lab = KINDS[kind](rng)
    assert img.GetDimension() == 3 and min(img.GetSize()) >= 1
    assert lab["anatomy"] == ANATOMY.index(EXPECTED[kind]) and lab["region"] == -1
    thumbs, feats = series_inputs(img, hdr)
    assert thumbs.shape == (3, THUMB_SIZE, THUMB_SIZE) and feats.shape == (N_FEATURES,)
    assert np.isfinite(thumbs).all() and np.isfinite(feats).all() and thumbs.max() > 0


def test_brain_epi_is_a_coarse_thick_slice_volume() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        img, _, _ = KINDS["brain_epi"](rng)
        sx, sy, sz = img.GetSpacing()
        assert 1.8 <= sx <= 4.1 and 2.5 <= sz <= 5.0 and img.GetSize()[0] <= 96


def test_epi_artefacts_keep_shape_and_are_non_negative() -> None:
    arr = np.zeros((4, 32, 32), np.float32)
    arr[:, 8:24, 8:24] = 1.0
    out = epi_artefacts(arr, np.random.default_rng(0), snr=20.0)
    assert out.shape == arr.shape and out.dtype == np.float32 and (out >= 0).all()
    assert out[:, 12:20, 12:20].mean() > 3 * out[:, :4, :4].mean()


def _base(n: int = 4) -> SampleSet:
    return SampleSet(np.zeros((n, 3, THUMB_SIZE, THUMB_SIZE), np.float32), np.zeros((n, N_FEATURES), np.float32),
                     {k: np.zeros(n, np.int64) for k in TASKS}, np.asarray(["p-x"] * n), np.ones(n, bool),
                     np.ones(n, np.int8), -np.ones(n, np.int64), {"samples_key": "base"})


def test_no_nonspine_keys_leave_the_samples_untouched() -> None:
    base = _base()
    assert _with_nonspine(base, {"n_aug": 16}, 0, "base") is base
    assert _with_nonspine(base, {"n_nonspine": {"brain_epi": 0}}, 0, "base") is base
    assert set(EXTRA_DATA_KEYS) == {"n_nonspine", "nonspine_seed"}


def test_nonspine_samples_are_appended_as_synthetic_and_change_the_key() -> None:
    out = _with_nonspine(_base(), {"n_nonspine": {"ct_crop": 1, "phantom_scan": 1}}, 0, "base")
    assert len(out.groups) == 6 and list(out.groups[4:]) == ["synth-scenes"] * 2
    assert not out.real[4:].any() and (out.stored[4:] == 0).all()
    assert out.labels["anatomy"][4:].tolist() == [ANATOMY.index("abdomen"), ANATOMY.index("other")]
    assert out.meta["samples_key"] != "base" and out.meta["base_samples_key"] == "base"
    again = _with_nonspine(_base(), {"n_nonspine": {"ct_crop": 1, "phantom_scan": 1}}, 0, "base")
    assert np.array_equal(again.thumbs, out.thumbs)  # deterministic for a seed


def test_unknown_nonspine_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="n_nonspine"):
        _with_nonspine(_base(), {"n_nonspine": {"knee": 3}}, 0, "base")
