"""sci_node.routing.header_rules: sequence weighting from MR physics; Enhanced MR header evidence."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from sci_node.routing.evidence import HeaderEvidence
from sci_node.routing.header_rules import ernst_angle_deg, sequence_from_header, white_matter_t1_ms


def _ev(scan: str, variant: str = "", **kw: float) -> HeaderEvidence:
    return HeaderEvidence(scanning_sequence=tuple(scan.split("_")) if scan else None,
                          sequence_variant=tuple(variant.split("_")) if variant else None, **kw)


@pytest.mark.parametrize("ev,label,rule", [
    # the cases of issue 14: a T1w spin echo (TR 600, TE 10) and an axial T2*w multi-echo GRE
    (_ev("SE", "SK_SP", echo_time_ms=10, repetition_time_ms=600, flip_angle_deg=90), "T1w", "spin-echo"),
    (_ev("GR", "SP", echo_time_ms=14, repetition_time_ms=600, flip_angle_deg=30, echo_train_length=3),
     "T2starw", "gradient-echo"),
    # spine-generic protocols (BIDS sidecars of the team data)
    (_ev("SE", "SK_SP_OSP", echo_time_ms=120, repetition_time_ms=1500, flip_angle_deg=120, echo_train_length=76),
     "T2w", "spin-echo"),
    (_ev("GR_IR", "SK_SP_MP", echo_time_ms=3.72, repetition_time_ms=2000, inversion_time_ms=1000,
         flip_angle_deg=9), "T1w", "inversion"),
    (_ev("GR", "SP", echo_time_ms=3.13, repetition_time_ms=35, flip_angle_deg=9), "other", "gradient-echo"),
    (_ev("GR", "MTC_SP", echo_time_ms=3.13, repetition_time_ms=35, flip_angle_deg=9), "other", "mt"),
    (_ev("EP", "SK", echo_time_ms=30, repetition_time_ms=3000, flip_angle_deg=90), "other", "epi"),
    (_ev("SE_EP", "SK_SP", echo_time_ms=70, repetition_time_ms=6000), "other", "epi"),
    (_ev("IR", "SK_SP", echo_time_ms=50, repetition_time_ms=4000, inversion_time_ms=180), "other", "inversion"),
    (_ev("SE_IR", "SK_SP_OSP", echo_time_ms=100, repetition_time_ms=9000, inversion_time_ms=2500), "other",
     "inversion"),
    (_ev("SE", "SK_SP", echo_time_ms=20, repetition_time_ms=3000), "other", "spin-echo"),  # proton density
    # 3-D VIBE-like spoiled GRE, flip well above the Ernst angle at 1.5 T
    (_ev("GR", "SP", echo_time_ms=2.8, repetition_time_ms=5.5, flip_angle_deg=12, magnetic_field_t=1.5),
     "T1w", "gradient-echo"),
])
def test_rules_decide_complete_unambiguous_headers(ev: HeaderEvidence, label: str, rule: str) -> None:
    out = sequence_from_header(ev)
    assert (out.label, out.rule) == (label, rule)
    assert out.detail


@pytest.mark.parametrize("ev,rule", [
    (None, "incomplete"),
    (HeaderEvidence(echo_time_ms=100, repetition_time_ms=3000), "incomplete"),  # no ScanningSequence
    (_ev("GR", "SP", echo_time_ms=14, repetition_time_ms=600), "gradient-echo"),  # flip missing
    (_ev("SE", "SK", echo_time_ms=50, repetition_time_ms=1000), "spin-echo"),  # intermediate TE/TR
    (_ev("SE", "SK", echo_time_ms=10, repetition_time_ms=30), "contradiction"),  # SE cannot repeat every 30 ms
    (_ev("GR", "SP", echo_time_ms=40, repetition_time_ms=20, flip_angle_deg=10), "contradiction"),  # TE >= TR
    (_ev("GR", "SS", echo_time_ms=2.5, repetition_time_ms=5, flip_angle_deg=50), "steady-state"),  # bSSFP
    (_ev("GR", "SP", echo_time_ms=3, repetition_time_ms=35, flip_angle_deg=15), "gradient-echo"),  # ~Ernst
    (_ev("GR_IR", "SP_MP", echo_time_ms=3, repetition_time_ms=2000, flip_angle_deg=9), "inversion"),  # no TI
])
def test_rules_leave_incomplete_or_ambiguous_headers_to_the_image(ev: HeaderEvidence | None, rule: str) -> None:
    out = sequence_from_header(ev)
    assert out.label is None and out.rule == rule


def test_ernst_angle_and_field_dependence() -> None:
    assert ernst_angle_deg(35, 850) == pytest.approx(16.3, abs=0.1)
    assert white_matter_t1_ms(None) == 850 and white_matter_t1_ms(1.5) < white_matter_t1_ms(3) < white_matter_t1_ms(7)
    # the same GRE protocol is T1-weighted at 1.5 T (short T1, larger Ernst angle ratio) but not at 7 T
    ev = _ev("GR", "SP", echo_time_ms=3, repetition_time_ms=20, flip_angle_deg=17)
    assert sequence_from_header(HeaderEvidence(**{**ev.__dict__, "magnetic_field_t": 1.5})).label is None
    assert sequence_from_header(HeaderEvidence(**{**ev.__dict__, "magnetic_field_t": 7.0})).label == "T1w"


def test_free_text_never_decides() -> None:
    ev = _ev("SE", "SK", echo_time_ms=10, repetition_time_ms=500)
    lying = HeaderEvidence(**{**ev.__dict__, "series_description": "T2 FLAIR", "sequence_name": "t2_tse"})
    assert sequence_from_header(lying) == sequence_from_header(ev)


def _enhanced(echo_pulse: str, **top: str) -> Dataset:
    ds = Dataset()
    ds.EchoPulseSequence = echo_pulse
    for k, v in top.items():
        setattr(ds, k, v)
    timing = Dataset()
    timing.RepetitionTime = 35.0
    timing.FlipAngle = 9.0
    timing.EchoTrainLength = 1
    echo = Dataset()
    echo.EffectiveEchoTime = 3.1
    modifier = Dataset()
    modifier.InversionRecovery = "NO"
    imaging = Dataset()
    imaging.MagnetizationTransfer = "ON_RESONANCE"
    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MREchoSequence = Sequence([echo])
    shared.MRModifierSequence = Sequence([modifier])
    shared.MRImagingModifierSequence = Sequence([imaging])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    return ds


def test_enhanced_mr_attributes_become_classic_codes() -> None:
    ev = HeaderEvidence.from_dicom(_enhanced("GRADIENT", MagneticFieldStrength="3"))
    assert ev.scanning_sequence == ("GR",) and ev.sequence_variant == ("MTC",)
    assert (ev.echo_time_ms, ev.repetition_time_ms, ev.flip_angle_deg, ev.echo_train_length) == (3.1, 35.0, 9.0, 1.0)
    assert ev.magnetic_field_t == 3.0
    assert sequence_from_header(ev).rule == "mt"
    epi = HeaderEvidence.from_dicom(_enhanced("SPIN", EchoPlanarPulseSequence="YES"))
    assert epi.scanning_sequence == ("SE", "EP") and sequence_from_header(epi).label == "other"
    # a classic ScanningSequence wins over the Enhanced attributes
    both = _enhanced("GRADIENT")
    both.ScanningSequence = "SE"
    assert HeaderEvidence.from_dicom(both).scanning_sequence == ("SE",)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_bad_echo_train_length_names_the_attribute() -> None:
    from pydicom.dataelem import RawDataElement

    from sci_node.errors import InvalidDatasetError

    ds = Dataset()
    ds[0x00180091] = RawDataElement(pydicom.tag.Tag(0x00180091), "IS", 4, b"x1y ", 0, False, True)
    with pytest.raises(InvalidDatasetError, match="EchoTrainLength"):
        HeaderEvidence.from_dicom(ds)
