"""sci_node.routing.anatomy_rules + the routing guards: the header anatomy veto and the localiser guard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pydicom
import pytest
from pydicom.data import DATA_ROOT

from sci_node.config import RoutingRules, load_config
from sci_node.errors import ConfigError
from sci_node.routing import route, slice_count
from sci_node.routing.anatomy_rules import anatomy_from_header, body_part_class, mentions_spine, names_non_spine
from sci_node.routing.cls_features import header_features
from sci_node.routing.evidence import HeaderEvidence
from sci_node.routing.header_rules import sequence_from_header

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO / "tests" / "data" / "series"
PYDICOM = Path(DATA_ROOT) / "test_files"  # bundled with pydicom, never downloaded


def _dicom_evidence(path: Path) -> HeaderEvidence:
    return HeaderEvidence.from_dicom(pydicom.dcmread(path, stop_before_pixels=True))


# -- real headers ----------------------------------------------------------------------------

@pytest.mark.parametrize("path,label,rule", [
    # pydicom's abdominal MR (pyd-abdomen): BodyPartExamined ABDOMEN, study 'abdomen^liver'
    (PYDICOM / "examples_overlay.dcm", "abdomen", "body-part"),
    (PYDICOM / "MR_small.dcm", None, "incomplete"),  # no free text at all: the image decides
    (SERIES / "brain_axial_T1w" / "0001.dcm", "brain", "head-body-part"),  # HEAD + 'T1 MPRAGE AX brain'
    (SERIES / "lumbar_sag_T2w" / "0001.dcm", None, "spine-named"),  # LSPINE
    (SERIES / "pam50_sag_T2w" / "0001.dcm", None, "spine-named"),  # CSPINE
    (SERIES / "unf01_axial_T2w" / "0001.dcm", None, "spine-named"),
    (REPO / "sample" / "series" / "0001.dcm", None, "spine-named"),
])
def test_real_dicom_headers(path: Path, label: str | None, rule: str) -> None:
    r = anatomy_from_header(_dicom_evidence(path))
    assert (r.label, r.rule) == (label, rule), r


def test_reason_names_the_header_value() -> None:
    r = anatomy_from_header(_dicom_evidence(PYDICOM / "examples_overlay.dcm"))
    assert r.detail.startswith("BodyPartExamined 'ABDOMEN' names a non-spine body part")


def test_free_text_is_read_from_dicom_and_sidecar_and_cleared_for_the_classifiers() -> None:
    ds = pydicom.dcmread(PYDICOM / "MR_small.dcm", stop_before_pixels=True)
    ds.BodyPartExamined, ds.ProtocolName, ds.StudyDescription, ds.SeriesDescription = (
        "HEAD", "t2_tse_sag_C-SPINE", "Neuro^Kopf", "t2 sag")
    ev = HeaderEvidence.from_dicom(ds)
    assert (ev.body_part_examined, ev.protocol_name, ev.study_description) == ("HEAD", "t2_tse_sag_C-SPINE",
                                                                               "Neuro^Kopf")
    assert anatomy_from_header(ev).rule == "spine-named"  # head-neck coil with a C-spine protocol: no veto
    side = HeaderEvidence.from_bids_sidecar({"BodyPartExamined": "KNEE", "ProtocolName": "pd_tse_fs_sag",
                                             "StudyDescription": "Ortho^Knie", "SeriesDescription": "PD FS"})
    assert (side.protocol_name, side.study_description) == ("pd_tse_fs_sag", "Ortho^Knie")
    assert anatomy_from_header(side).label == "other"
    bare = ev.without_text()
    assert (bare.body_part_examined, bare.protocol_name, bare.study_description, bare.series_description) == (None,) * 4
    # the new free-text fields are no classifier input: features and sequence rules unchanged
    assert np.array_equal(header_features(ev), header_features(bare))
    assert sequence_from_header(ev) == sequence_from_header(bare)


# -- the rules on vendor-style headers (textbook cases, not fitted) ---------------------------

def _ev(body: str | None = None, series: str | None = None, protocol: str | None = None,
        study: str | None = None) -> HeaderEvidence:
    return HeaderEvidence(body_part_examined=body, series_description=series, protocol_name=protocol,
                          study_description=study)


@pytest.mark.parametrize("ev,label,rule", [
    # the fMRI-Leipzig cervical GRE-EPI sidecar: a spine series that says BRAIN (Siemens head-neck coil)
    (_ev("BRAIN", "ninEPI_bold_v12A_ZShimManual", "ninEPI_bold_v12A_ZShimManual"), None, "head-uncorroborated"),
    (_ev("HEAD", "T2 TSE SAG", "t2_tse_sag_C-SPINE"), None, "spine-named"),
    (_ev("HEAD", "localizer", study="Brain^Routine"), None, "head-uncorroborated"),
    (_ev("HEAD", "t1_mprage_sag_brain"), "brain", "head-body-part"),
    (_ev("HEADNECK", "t2 head"), None, "spine-named"),
    (_ev("NECK", "t2_tse_tra"), None, "spine-named"),
    (_ev("C-SPINE"), None, "spine-named"),
    (_ev("ABDOMEN", "t2_haste_cor"), "abdomen", "body-part"),
    (_ev("PELVIS", "t2_tse_tra_prostate"), "abdomen", "body-part"),
    (_ev("ABDOMEN", "T2 SAG L-SPINE"), None, "spine-named"),  # a lumbar spine in the abdomen programme
    (_ev("KNEE", "pd_tse_fs_cor"), "other", "body-part"),
    (_ev("CHEST", "t2_tse_sag"), None, "no-anatomy"),  # the chest holds the thoracic spine: neutral
    (_ev("WHOLEBODY", "stir_cor"), None, "no-anatomy"),
    (_ev(None, "T1 MPRAGE AX brain"), "brain", "series-text"),
    (_ev(None, "t2_tse_sag", study="MRT Schädel"), None, "study-only"),  # the study may hold spine series too
    (_ev(None, "T2 sag HWS", study="MRT Kopf"), None, "spine-named"),
    (_ev(None, "Wirbelsäule sag T2"), None, "spine-named"),
    (_ev(None, "T2 sag cord myelon"), None, "spine-named"),
    (_ev(None, "t2 brainstem sag"), None, "spine-named"),  # cervicomedullary junction: the image decides
    (_ev(None, "ax_asc_35sl", study="Research^MCBI_TESTING"), None, "no-anatomy"),  # dcm_qa brain EPI
    (None, None, "incomplete"),
])
def test_rules(ev: HeaderEvidence | None, label: str | None, rule: str) -> None:
    r = anatomy_from_header(ev)
    assert (r.label, r.rule) == (label, rule), r


def test_text_normalisation() -> None:
    for text in ("C-SPINE", "c_spine", "C Spine", "cspine", "TL-SPINE", "Halswirbelsäule", "LWS"):
        assert mentions_spine(text), text
    for text in ("record", "t1_tse_tra", "Head first"):
        assert not mentions_spine(text), text
    assert names_non_spine("Abdomen^Leber") == "abdomen" and names_non_spine("t2_tse_tra") is None
    assert [body_part_class(v) for v in ("LSPINE", "tspine", "HEAD", "Liver", "CHEST", "", None)] == [
        "spine", "spine", "brain", "abdomen", None, None, None]


# -- routing: precedence, switch, localiser guard -------------------------------------------

SPINE = {"spine": 0.95, "brain": 0.03, "abdomen": 0.01, "other": 0.01}
BRAIN = {"spine": 0.05, "brain": 0.9, "abdomen": 0.03, "other": 0.02}


def _classify(anatomy: Mapping[str, float], calls: list[str]):
    table = {"anatomy": {"anatomy": anatomy},
             "region_view": {"region": {"cervical": 0.8, "thoracic": 0.1, "lumbar": 0.1},
                             "view": {"sagittal": 0.9, "axial": 0.05, "coronal": 0.05}},
             "sequence": {"sequence": {"T1w": 0.05, "T2w": 0.9, "T2starw": 0.03, "other": 0.02}}}

    def classify(model: str) -> Mapping[str, Mapping[str, float]]:
        calls.append(model)
        return table[model]
    return classify


def test_header_veto_routes_out_before_the_network() -> None:
    calls: list[str] = []
    ev = _dicom_evidence(PYDICOM / "examples_overlay.dcm")
    d = route(_classify(SPINE, calls), RoutingRules(), evidence=ev, n_slices=20)
    assert d.routed_out and calls == []  # the network that would have said spine is not asked
    assert d.rule == "route-out: header anatomy (body-part-v1 body-part) != spine"
    assert d.reason and d.reason.startswith("BodyPartExamined 'ABDOMEN' names a non-spine body part")
    out = d.as_dict()
    assert out["anatomy"]["label"] == "abdomen" and out["anatomy"]["decided_by"].startswith("header rule body-part")


def test_veto_switched_off_leaves_the_network() -> None:
    ev = _dicom_evidence(PYDICOM / "examples_overlay.dcm")
    d = route(_classify(SPINE, []), RoutingRules(header_anatomy_veto=False), evidence=ev, n_slices=20)
    assert d.segment_cord and "decided_by" not in d.as_dict()["anatomy"]


def test_header_never_routes_in() -> None:
    """A spine body part does not overrule an image the network calls brain; it is recorded."""
    ev = _dicom_evidence(SERIES / "pam50_sag_T2w" / "0001.dcm")
    calls: list[str] = []
    d = route(_classify(BRAIN, calls), RoutingRules(), evidence=ev, n_slices=16)
    assert d.routed_out and calls == ["anatomy"] and d.rule == "route-out: anatomy != spine"
    assert d.heads["anatomy"].decided_by == ("network (header rule spine-named: BodyPartExamined 'CSPINE', "
                                             "SeriesDescription 'T2 TSE SAG cervical', StudyDescription "
                                             "'MRI spine (sample)' mentions the spine, cord or neck "
                                             "(the header only routes out))")
    spine = route(_classify(SPINE, []), RoutingRules(), evidence=ev, n_slices=16)
    assert spine.segment_cord and spine.segment_lesions


@pytest.mark.parametrize("n,rules,reason", [
    (1, RoutingRules(), "1 slice: a localiser or a single-slice series, not a volume to segment"),
    (2, RoutingRules(min_slices=3), "2 slices: a localiser or a stack thinner than min_slices 3, not a volume "
                                    "to segment"),
    (2, RoutingRules(), None),  # default 2: a 2-slice axial stack is segmented (ivadomed sub-unf02 T2star)
    (3, RoutingRules(min_slices=3), None),
    (1, RoutingRules(min_slices=1), None),  # 1 = guard off
    (5, RoutingRules(min_slices=6), "5 slices"),
])
def test_localiser_guard(n: int, rules: RoutingRules, reason: str | None) -> None:
    calls: list[str] = []
    d = route(_classify(SPINE, calls), rules, n_slices=n)
    if reason is None:
        assert d.segment_cord and calls
    else:
        assert d.routed_out and calls == [] and d.heads == {}
        assert reason in str(d.reason) and d.rule.startswith(f"route-out: {n} slice")


def test_slice_count() -> None:
    assert slice_count((64, 64, 1)) == 1 and slice_count((7, 125, 125)) == 7 and slice_count((64, 64)) == 1
    assert slice_count((45, 45, 2, 4)) == 2


def test_route_series_on_real_single_slices() -> None:
    """pydicom's abdomen and MR_small through the shipped classifiers: both stopped before any network."""
    import torch

    from sci_node.pipeline.route_report import load_classifiers, route_series
    from sci_node.pipeline.series import read_series

    torch.set_num_threads(1)
    classifiers = load_classifiers(REPO / "models")
    for name in ("examples_overlay.dcm", "MR_small.dcm"):
        vol = read_series([PYDICOM / name])
        rep = route_series(classifiers, vol.image, HeaderEvidence.from_dicom(vol.first), RoutingRules())
        assert rep["slices"] == 1 and not rep["segment_cord"] and rep["levels"] == {}
        assert rep["reason"] == "1 slice: a localiser or a single-slice series, not a volume to segment"
    vol = read_series([PYDICOM / "examples_overlay.dcm"])
    rep = route_series(classifiers, vol.image, HeaderEvidence.from_dicom(vol.first), RoutingRules(min_slices=1))
    assert rep["levels"]["anatomy"]["decided_by"].startswith("header rule body-part: BodyPartExamined 'ABDOMEN'")
    assert rep["rule"].startswith("route-out: header anatomy") and "sequence" not in rep["levels"]


def test_routing_config_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[routing]\nheader_anatomy_veto = false\nmin_slices = 1\n")
    cfg = load_config(good)
    assert (cfg.routing.header_anatomy_veto, cfg.routing.min_slices) == (False, 1)
    assert (RoutingRules().header_anatomy_veto, RoutingRules().min_slices) == (True, 2)
    bad = tmp_path / "bad.toml"
    bad.write_text('[routing]\nheader_anatomy_veto = "yes"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "routing.header_anatomy_veto: invalid value 'yes'" in str(info.value)
    bad.write_text('[routing]\nmin_slices = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "routing.min_slices: 0 must be >= 1" in str(info.value)


def test_sidecar_of_a_nifti_is_read(tmp_path: Path) -> None:
    """The BIDS path of ``sci-node route``: a sidecar naming a knee routes the NIfTI out by its header."""
    import SimpleITK as sitk

    from sci_node.pipeline.batch import find_inputs
    from sci_node.pipeline.route_report import load_item

    img = sitk.ReadImage(str(REPO / "tests" / "data" / "cls" / "spine_ax_T2w_cervical.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "knee.nii.gz"))
    (tmp_path / "knee.json").write_text(json.dumps({"BodyPartExamined": "KNEE", "ProtocolName": "t2_tse_tra"}))
    (item,) = find_inputs(tmp_path)
    image, ev = load_item(item)
    d = route(_classify(SPINE, []), RoutingRules(), evidence=ev, n_slices=slice_count(image.GetSize()))
    assert d.routed_out and d.reason and d.reason.startswith("BodyPartExamined 'KNEE'")
    assert ev is not None and ev.protocol_name == "t2_tse_tra"


@pytest.mark.parametrize("part,region", [("LSPINE", "lumbar"), ("L-SPINE", "lumbar"), ("TSPINE", "thoracic"),
                                         ("CSPINE", "cervical"), ("SSPINE", "lumbar"), ("TLSPINE", None),
                                         ("SPINE", None), ("WHOLESPINE", None), (None, None)])
def test_region_from_the_body_part_defined_term(part: str | None, region: str | None) -> None:
    """A BodyPartExamined naming one spine region decides the region head (the network said cervical);
    spans and a missing value leave it to the network. The series is segmented either way."""
    ev = HeaderEvidence(body_part_examined=part)
    d = route(_classify(SPINE, []), RoutingRules(), evidence=ev, n_slices=16)
    assert d.segment_cord
    if region is None:
        assert d.heads["region"].label == "cervical" and d.heads["region"].decided_by is None
    else:
        assert d.heads["region"].label == region and d.heads["region"].probs == {region: 1.0}
        assert d.heads["region"].decided_by == (f"header rule body-part-region: BodyPartExamined {part!r} is the "
                                                f"{region} spine (DICOM defined term)")


def test_lumbar_sample_region_comes_from_its_header(capsys: pytest.CaptureFixture[str]) -> None:
    """The committed lumbar series (BodyPartExamined LSPINE) was called thoracic by the network (p 0.52)."""
    from sci_node.cli import main

    assert main(["route", str(REPO / "tests" / "data" / "series" / "lumbar_sag_T2w"), "--json",
                 "--log-level", "ERROR"]) == 0
    (rep,) = json.loads(capsys.readouterr().out)["series"]
    assert rep["levels"]["region"]["label"] == "lumbar"
    assert rep["levels"]["region"]["decided_by"].startswith("header rule body-part-region: BodyPartExamined 'LSPINE'")
