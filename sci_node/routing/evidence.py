"""Header evidence for the routing classifiers, from DICOM headers or BIDS JSON sidecars.

:class:`HeaderEvidence` is a frozen bag of optional acquisition parameters. Every field
may be ``None``: the classifiers must work from the image alone (NIfTI without sidecar,
anonymised headers, meaningless ``SeriesDescription``, absent ``BodyPartExamined``).

Units: times in milliseconds (DICOM's unit; BIDS sidecars store seconds and are
converted), flip angle in degrees, the slice normal as a unit vector in patient LPS.
The free-text fields (``body_part_examined``, ``series_description``, ``protocol_name``,
``study_description``) are never classifier inputs (the networks and the sequence rules
deliberately do not read them); only the anatomy header veto of
:mod:`sci_node.routing.anatomy_rules` reads them, and they are kept for the job record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from sci_node.errors import InvalidDatasetError

__all__ = ["HeaderEvidence", "view_from_normal"]

VIEWS = ("sagittal", "coronal", "axial")  # plane perpendicular to LPS axis 0, 1, 2


def _num(value: Any, field_name: str) -> float | None:
    """Float of a DICOM/JSON numeric value (first of a multi-value); ``None`` if absent."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidDatasetError(f"{field_name} {value!r} is not a number") from None
    if not math.isfinite(out):
        raise InvalidDatasetError(f"{field_name} {value!r} is not finite")
    return out


def _codes(value: Any) -> tuple[str, ...] | None:
    """Normalise a CS multi-value (``['SE', 'IR']``, ``'SK\\\\SP'`` or ``'SK_SP'``) to upper-case codes."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        parts = value.replace("\\", "_").split("_")
    else:
        parts = [str(v) for v in value]
    codes = tuple(p.strip().upper() for p in parts if p.strip())
    return codes or None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _normal_from_iop(iop: Any) -> tuple[float, float, float] | None:
    """Slice normal (row x column cosines) of an ImageOrientationPatient value, unit length, LPS."""
    if iop is None:
        return None
    vals = [float(v) for v in iop]
    if len(vals) != 6:
        raise InvalidDatasetError(f"ImageOrientationPatient {list(iop)!r} does not have 6 values")
    r, c = vals[:3], vals[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        raise InvalidDatasetError(f"ImageOrientationPatient {vals!r} has parallel row and column cosines")
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def view_from_normal(normal: tuple[float, float, float]) -> str:
    """Acquisition plane of a slice normal in LPS: ``sagittal`` (normal ~ L/R), ``coronal`` (A/P), ``axial`` (S/I)."""
    mags = [abs(v) for v in normal]
    return VIEWS[mags.index(max(mags))]


@dataclass(frozen=True)
class HeaderEvidence:
    """Acquisition parameters the classifiers may use; every field optional.

    Attributes
    ----------
    slice_normal : tuple[float, float, float] | None
        Unit normal of the slice plane in patient LPS (from ImageOrientationPatient).
    echo_time_ms, repetition_time_ms, inversion_time_ms : float | None
        TE, TR, TI in milliseconds.
    flip_angle_deg : float | None
    scanning_sequence, sequence_variant : tuple[str, ...] | None
        DICOM (0018,0020) / (0018,0021) codes, e.g. ``("SE",)``, ``("SK", "SP", "OSP")``.
    mr_acquisition_type : str | None
        ``"2D"`` or ``"3D"``.
    sequence_name : str | None
        (0018,0024), e.g. ``"_tfl3d1_16"``, ``"*tse2d1_15"``.
    echo_train_length : float | None
        (0018,0091) EchoTrainLength (echoes per excitation; TSE/FSE turbo factor, EPI lines).
    magnetic_field_t : float | None
        (0018,0087) MagneticFieldStrength in tesla.
    diffusion_b_value : float | None
        (0018,9087) DiffusionBValue in s/mm² (Enhanced MR diffusion macro).
    series_description, body_part_examined, protocol_name, study_description : str | None
        Free text: (0008,103E), (0018,0015), (0018,1030), (0008,1030). Never classifier input;
        read only by the anatomy veto (:mod:`sci_node.routing.anatomy_rules`) and recorded.
    """

    slice_normal: tuple[float, float, float] | None = None
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    flip_angle_deg: float | None = None
    scanning_sequence: tuple[str, ...] | None = None
    sequence_variant: tuple[str, ...] | None = None
    mr_acquisition_type: str | None = None
    sequence_name: str | None = None
    echo_train_length: float | None = None
    magnetic_field_t: float | None = None
    diffusion_b_value: float | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    protocol_name: str | None = None
    study_description: str | None = None

    @property
    def view(self) -> str | None:
        """Plane of :attr:`slice_normal` (``sagittal``/``coronal``/``axial``), ``None`` when unknown."""
        return None if self.slice_normal is None else view_from_normal(self.slice_normal)

    def without_text(self) -> "HeaderEvidence":
        """Copy with the free-text fields cleared (what the classifiers see)."""
        return replace(self, series_description=None, body_part_examined=None, protocol_name=None,
                       study_description=None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists), for job records and logs."""
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            val = getattr(self, key)
            out[key] = list(val) if isinstance(val, tuple) else val
        return out

    @classmethod
    def from_dicom(cls, ds: Any) -> "HeaderEvidence":
        """Evidence from one pydicom ``Dataset`` (classic MR; Enhanced MR shared groups are read too).

        Raises
        ------
        InvalidDatasetError
            A present attribute has an unusable value (non-numeric TE, 5-valued IOP, ...).
        """
        src = _flatten_enhanced(ds)
        acq = _text(src.get("MRAcquisitionType"))
        return cls(
            slice_normal=_normal_from_iop(src.get("ImageOrientationPatient")),
            echo_time_ms=_num(src.get("EchoTime"), "EchoTime"),
            repetition_time_ms=_num(src.get("RepetitionTime"), "RepetitionTime"),
            inversion_time_ms=_num(src.get("InversionTime"), "InversionTime"),
            flip_angle_deg=_num(src.get("FlipAngle"), "FlipAngle"),
            scanning_sequence=_codes(src.get("ScanningSequence")),
            sequence_variant=_codes(src.get("SequenceVariant")),
            mr_acquisition_type=acq.upper() if acq else None,
            sequence_name=_text(src.get("SequenceName") or src.get("PulseSequenceName")),
            echo_train_length=_num(src.get("EchoTrainLength"), "EchoTrainLength"),
            magnetic_field_t=_num(src.get("MagneticFieldStrength"), "MagneticFieldStrength"),
            diffusion_b_value=_num(src.get("DiffusionBValue"), "DiffusionBValue"),
            series_description=_text(src.get("SeriesDescription")),
            body_part_examined=_text(src.get("BodyPartExamined")),
            protocol_name=_text(src.get("ProtocolName")),
            study_description=_text(src.get("StudyDescription")),
        )

    @classmethod
    def from_bids_sidecar(cls, sidecar: Mapping[str, Any]) -> "HeaderEvidence":
        """Evidence from a BIDS JSON sidecar (dcm2niix keys; times in seconds are converted to ms)."""
        def ms(key: str) -> float | None:
            val = _num(sidecar.get(key), key)
            return None if val is None else val * 1000.0

        acq = _text(sidecar.get("MRAcquisitionType"))
        iop = sidecar.get("ImageOrientationPatientDICOM")
        return cls(
            slice_normal=_normal_from_iop(iop) if iop is not None else None,
            echo_time_ms=ms("EchoTime"),
            repetition_time_ms=ms("RepetitionTime"),
            inversion_time_ms=ms("InversionTime"),
            flip_angle_deg=_num(sidecar.get("FlipAngle"), "FlipAngle"),
            scanning_sequence=_codes(sidecar.get("ScanningSequence")),
            sequence_variant=_codes(sidecar.get("SequenceVariant")),
            mr_acquisition_type=acq.upper() if acq else None,
            sequence_name=_text(sidecar.get("SequenceName") or sidecar.get("PulseSequenceDetails")),
            echo_train_length=_num(sidecar.get("EchoTrainLength"), "EchoTrainLength"),
            magnetic_field_t=_num(sidecar.get("MagneticFieldStrength"), "MagneticFieldStrength"),
            series_description=_text(sidecar.get("SeriesDescription")),
            body_part_examined=_text(sidecar.get("BodyPartExamined")),
            protocol_name=_text(sidecar.get("ProtocolName")),
            study_description=_text(sidecar.get("StudyDescription")),
        )


def _safe_get(ds: Any, keyword: str) -> Any:
    """``ds.get(keyword)``, turning pydicom's conversion errors of malformed values into ours."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidDatasetError(f"{keyword} has an unreadable value: {exc}") from None


def _flatten_enhanced(ds: Any) -> dict[str, Any]:
    """Top-level attributes plus those nested in Enhanced MR functional-group macros.

    Enhanced MR objects have no ScanningSequence / SequenceVariant; their MR Pulse Sequence
    module and MR Modifier macros say the same thing in other words, which
    :func:`_enhanced_codes` translates (only when the classic attributes are absent).
    """
    keys = ("ImageOrientationPatient", "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle",
            "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "SequenceName",
            "PulseSequenceName", "SeriesDescription", "BodyPartExamined", "ProtocolName", "StudyDescription",
            "EchoTrainLength",
            "MagneticFieldStrength", "DiffusionBValue", *_ENHANCED_KEYS)
    out: dict[str, Any] = {k: _safe_get(ds, k) for k in keys if k in ds}
    groups = []
    for seq_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if seq_kw in ds and len(ds[seq_kw].value) > 0:
            groups.append(ds[seq_kw].value[0])
    for grp in groups:
        for macro in ("PlaneOrientationSequence", "MRTimingAndRelatedParametersSequence", "MREchoSequence",
                      "MRModifierSequence", "MRImagingModifierSequence", "MRDiffusionSequence"):
            if macro in grp and len(grp[macro].value) > 0:
                item = grp[macro].value[0]
                for k in keys:
                    if k not in out and k in item:
                        out[k] = _safe_get(item, k)
                if "EffectiveEchoTime" in item and "EchoTime" not in out:
                    out["EchoTime"] = _safe_get(item, "EffectiveEchoTime")
                if "InversionTimes" in item and "InversionTime" not in out:
                    out["InversionTime"] = _safe_get(item, "InversionTimes")
    if "ScanningSequence" not in out:
        scan, variant = _enhanced_codes(out)
        if scan:
            out["ScanningSequence"] = scan
        if variant and "SequenceVariant" not in out:
            out["SequenceVariant"] = variant
    return out


#: Enhanced MR (MR Pulse Sequence module, MR Modifier / Imaging Modifier macros) attributes
#: that map onto the classic ScanningSequence / SequenceVariant codes.
_ENHANCED_KEYS = ("EchoPulseSequence", "EchoPlanarPulseSequence", "InversionRecovery", "MagnetizationTransfer",
                  "SteadyStatePulseSequence", "Spoiling")


def _enhanced_codes(attrs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Classic (ScanningSequence, SequenceVariant) codes from Enhanced MR attributes.

    EchoPulseSequence SPIN -> SE, GRADIENT -> GR, BOTH -> SE + GR; EchoPlanarPulseSequence
    YES -> EP; InversionRecovery YES -> IR; MagnetizationTransfer ON/OFF_RESONANCE -> MTC;
    SteadyStatePulseSequence TIME_REVERSED -> TRSS, any other steady state -> SS; Spoiling
    RF/GRADIENT/RF_AND_GRADIENT -> SP.
    """
    def up(key: str) -> str:
        return str(attrs.get(key) or "").strip().upper()

    scan = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(up("EchoPulseSequence"), [])
    if up("EchoPlanarPulseSequence") == "YES":
        scan.append("EP")
    if up("InversionRecovery") == "YES":
        scan.append("IR")
    variant = []
    if up("MagnetizationTransfer") in ("ON_RESONANCE", "OFF_RESONANCE"):
        variant.append("MTC")
    ss = up("SteadyStatePulseSequence")
    if ss == "TIME_REVERSED":
        variant.append("TRSS")
    elif ss and ss != "NONE":
        variant.append("SS")
    if up("Spoiling") in ("RF", "GRADIENT", "RF_AND_GRADIENT"):
        variant.append("SP")
    return scan, variant
