"""Sequence class from the DICOM/BIDS header by MR physics, when the header is complete and unambiguous.

The ``sequence`` classifier asks :func:`sequence_from_header` first. When a rule fires, its
class is the answer (the image network is not asked to overrule the physics of the
acquisition); when the header is incomplete, self-contradictory or in a grey zone between
two weightings, no rule fires and the image network decides. The rules read only
acquisition parameters (ScanningSequence, SequenceVariant, TE, TR, TI, flip angle, echo
train length, b-value, field strength; Enhanced MR attributes are translated into the
classic codes by :mod:`sci_node.routing.evidence`), never free text, and were written from textbook
contrast physics, not fitted to the training data.

Rules, in order (the first that applies wins; ``None`` = "image decides"):

1. ``incomplete``: no ScanningSequence code -> None.
2. ``contradiction``: TE >= TR, or a pure spin echo (SE without GR/EP) with TR < 100 ms
   (a 90°/180° spin echo cannot reach a steady state that fast) -> None.
3. ``epi``: EP in ScanningSequence (DWI, BOLD, perfusion EPI) -> other.
4. ``diffusion``: b-value > 0 -> other.
5. ``mt``: MTC in SequenceVariant (magnetisation-transfer preparation) -> other.
6. ``inversion``: IR in ScanningSequence, or MP with an inversion time. TI < 350 ms nulls
   fat (STIR; TI ≈ 0.69·T1_fat, 140-260 ms at 1.5-3 T) -> other; TI >= 1500 ms nulls CSF
   (FLAIR; TI ≈ 0.69·T1_CSF) -> other; 350 <= TI < 1500 ms is T1 preparation
   (MPRAGE/TFE/IR-FSPGR, T1-FLAIR) -> T1w when the readout is a gradient echo or a short-TE
   spin echo (TE < 30 ms), else None. Without TI -> None.
7. ``steady-state``: SS or TRSS in SequenceVariant (balanced / unspoiled SSFP: mixed
   T2/T1 contrast, CISS/FIESTA/PSIF) -> None.
8. ``spin-echo`` (SE, no GR): TE <= 30 ms and TR <= 1000 ms -> T1w; TE >= 60 ms and
   (TR >= 1200 ms, or echo train >= 40: single-shot and 3-D variable-flip TSE) -> T2w;
   TE <= 40 ms and TR >= 1500 ms -> other (proton density); anything else -> None.
9. ``gradient-echo`` (GR, no SE): needs TE, TR and flip angle. TE >= 10 ms with a flip
   <= 45° -> T2starw (T2* decay over TE is a large fraction of tissue T2* ≈ 30-60 ms).
   TE < 8 ms: the contrast is set by the flip angle against the Ernst angle
   ``acos(exp(-TR/T1))`` of white matter (T1 = 650 / 850 / 1200 ms at 1.5 / 3 / 7 T, 850 ms
   when the field is unknown): flip >= 1.25 × Ernst -> T1w; flip <= 0.75 × Ernst ->
   other (proton-density GRE, e.g. MT-off); in between, or 8 <= TE < 10 ms -> None.
10. anything else -> None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sci_node.routing.evidence import HeaderEvidence

__all__ = ["RULES_ID", "HeaderRule", "sequence_from_header", "white_matter_t1_ms", "ernst_angle_deg"]

#: Version of the rules; a classifier card names it (``calibration.header_rules.id``).
RULES_ID = "mr-physics-v1"


@dataclass(frozen=True)
class HeaderRule:
    """Outcome of the header rules.

    Attributes
    ----------
    label : str | None
        ``T1w``/``T2w``/``T2starw``/``other``, or ``None`` when the image must decide.
    rule : str
        Name of the rule that applied (``spin-echo``, ``epi``, ``incomplete`` ...).
    detail : str
        The values that made it apply, for the job record and ``sci-node route``.
    """

    label: str | None
    rule: str
    detail: str


def white_matter_t1_ms(field_t: float | None) -> float:
    """Approximate white-matter T1 (ms) at ``field_t`` tesla (850 ms when unknown)."""
    if field_t is None or field_t <= 0:
        return 850.0
    if field_t < 2.0:
        return 650.0
    if field_t < 5.0:
        return 850.0
    return 1200.0


def ernst_angle_deg(tr_ms: float, t1_ms: float) -> float:
    """Ernst angle ``acos(exp(-TR/T1))`` in degrees (flip of maximal spoiled-GRE signal)."""
    return math.degrees(math.acos(math.exp(-tr_ms / t1_ms)))


def _fmt(ev: HeaderEvidence) -> str:
    parts = [f"scan={'/'.join(ev.scanning_sequence or ()) or '-'}",
             f"variant={'/'.join(ev.sequence_variant or ()) or '-'}"]
    for name, val in (("TE", ev.echo_time_ms), ("TR", ev.repetition_time_ms), ("TI", ev.inversion_time_ms),
                      ("flip", ev.flip_angle_deg), ("ETL", ev.echo_train_length)):
        if val is not None:
            parts.append(f"{name}={val:g}")
    return " ".join(parts)


def sequence_from_header(ev: HeaderEvidence | None) -> HeaderRule:
    """Apply the rules of the module docstring to ``ev``.

    Parameters
    ----------
    ev : HeaderEvidence | None
        Header evidence (times in ms, flip in degrees); ``None`` = no header.

    Returns
    -------
    HeaderRule
        ``label`` is ``None`` whenever the header does not settle the weighting.
    """
    if ev is None or not ev.scanning_sequence:
        return HeaderRule(None, "incomplete", "no ScanningSequence")
    scan, var, d = set(ev.scanning_sequence), set(ev.sequence_variant or ()), _fmt(ev)
    te, tr = ev.echo_time_ms, ev.repetition_time_ms
    if te is not None and tr is not None and tr > 0 and te >= tr:
        return HeaderRule(None, "contradiction", f"TE >= TR ({d})")
    if "SE" in scan and not scan & {"GR", "EP"} and tr is not None and 0 < tr < 100:
        return HeaderRule(None, "contradiction", f"spin echo with TR < 100 ms ({d})")
    if "EP" in scan:
        return HeaderRule("other", "epi", d)
    if ev.diffusion_b_value is not None and ev.diffusion_b_value > 0:
        return HeaderRule("other", "diffusion", f"b={ev.diffusion_b_value:g} {d}")
    if "MTC" in var:
        return HeaderRule("other", "mt", d)
    if "IR" in scan or ("MP" in var and ev.inversion_time_ms):
        return _inversion(ev, scan, d)
    if var & {"SS", "TRSS"}:
        return HeaderRule(None, "steady-state", d)
    if "SE" in scan and "GR" not in scan:
        return _spin_echo(ev, d)
    if "GR" in scan and "SE" not in scan:
        return _gradient_echo(ev, d)
    return HeaderRule(None, "no-rule", d)


def _inversion(ev: HeaderEvidence, scan: set[str], d: str) -> HeaderRule:
    ti, te = ev.inversion_time_ms, ev.echo_time_ms
    if ti is None or ti <= 0:
        return HeaderRule(None, "inversion", f"no inversion time ({d})")
    if ti < 350:
        return HeaderRule("other", "inversion", f"STIR, fat-nulling TI ({d})")
    if ti >= 1500:
        return HeaderRule("other", "inversion", f"FLAIR, CSF-nulling TI ({d})")
    if "GR" in scan or (te is not None and te < 30):
        return HeaderRule("T1w", "inversion", f"T1 preparation ({d})")
    return HeaderRule(None, "inversion", f"T1-range TI with a long-TE readout ({d})")


def _spin_echo(ev: HeaderEvidence, d: str) -> HeaderRule:
    te, tr, etl = ev.echo_time_ms, ev.repetition_time_ms, ev.echo_train_length
    if te is None or tr is None:
        return HeaderRule(None, "spin-echo", f"TE or TR missing ({d})")
    if te <= 30 and tr <= 1000:
        return HeaderRule("T1w", "spin-echo", f"short TE, short TR ({d})")
    if te >= 60 and (tr >= 1200 or (etl is not None and etl >= 40)):
        return HeaderRule("T2w", "spin-echo", f"long TE, long TR or long echo train ({d})")
    if te <= 40 and tr >= 1500:
        return HeaderRule("other", "spin-echo", f"proton density: short TE, long TR ({d})")
    return HeaderRule(None, "spin-echo", f"intermediate TE/TR ({d})")


def _gradient_echo(ev: HeaderEvidence, d: str) -> HeaderRule:
    te, tr, flip = ev.echo_time_ms, ev.repetition_time_ms, ev.flip_angle_deg
    if te is None or tr is None or flip is None:
        return HeaderRule(None, "gradient-echo", f"TE, TR or flip missing ({d})")
    if te >= 10:
        if flip <= 45:
            return HeaderRule("T2starw", "gradient-echo", f"long TE, low flip ({d})")
        return HeaderRule(None, "gradient-echo", f"long TE with a high flip ({d})")
    if te >= 8:
        return HeaderRule(None, "gradient-echo", f"intermediate TE ({d})")
    ernst = ernst_angle_deg(tr, white_matter_t1_ms(ev.magnetic_field_t))
    if flip >= 1.25 * ernst:
        return HeaderRule("T1w", "gradient-echo", f"short TE, flip >= 1.25 x Ernst {ernst:.1f} deg ({d})")
    if flip <= 0.75 * ernst:
        return HeaderRule("other", "gradient-echo", f"proton density: flip <= 0.75 x Ernst {ernst:.1f} deg ({d})")
    return HeaderRule(None, "gradient-echo", f"flip near the Ernst angle {ernst:.1f} deg ({d})")
