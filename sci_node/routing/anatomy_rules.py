"""Anatomy from the DICOM/BIDS header: a conservative veto for series that name a non-spine body part.

The routing (:func:`sci_node.routing.route`) asks :func:`anatomy_from_header` before the anatomy
network when ``[routing] header_anatomy_veto`` is on (the default). The header can only route a
series **out**, never in: a rule that fires gives the anatomy class (``brain``, ``abdomen`` or
``other``) and the series is routed out without asking the network; in every other case the
network decides as before, and a header that names the spine is recorded but changes nothing
(a spine body part does not overrule an image that the network calls brain).

Fields read (:class:`sci_node.routing.evidence.HeaderEvidence`, DICOM or BIDS sidecar): BodyPartExamined
(0018,0015), SeriesDescription (0008,103E), ProtocolName (0018,1030) — series-level — and
StudyDescription (0008,1030), which describes the whole study (a study can hold brain and spine
series) and therefore can only *protect* a series, never veto it. Text is compared after
lower-casing, transliterating umlauts (ä → ae ...) and turning punctuation into spaces, so
``C-SPINE``, ``c_spine`` and ``C Spine`` read alike.

Rules, in order (the first that applies wins; ``label=None`` = "the network decides"):

1. ``incomplete``: none of the four fields is present -> None.
2. ``spine-named``: any of the four fields mentions the spine, the cord or the neck
   (:data:`SPINE_WORDS`; a BodyPartExamined containing ``SPINE``, or NECK, HEADNECK, NECKCHEST)
   -> None. This protects head-neck coil set-ups (``HEAD`` with a ``C-SPINE`` protocol).
3. ``body-part``: BodyPartExamined is a non-spine, non-head region of DICOM PS3.16 CID 4030
   (ABDOMEN, PELVIS, LIVER, KNEE, SHOULDER, BREAST, HEART ...: :data:`BODY_PARTS`) -> its class.
   Regions that contain the spine (CHEST, THORAX, WHOLEBODY, CHESTABDOMEN ...) and unknown
   values never veto.
4. ``head-body-part``: BodyPartExamined is the head (HEAD, BRAIN, SKULL, ORBIT ...) **and**
   SeriesDescription or ProtocolName names a non-spine part too -> brain. A head body part alone
   (``head-uncorroborated``) -> None: Siemens derives BodyPartExamined from the coil/programme,
   and cervical-cord scans in the head-neck coil carry ``BRAIN`` (the fMRI-Leipzig cervical
   GRE-EPI sidecar in the team data says ``BRAIN`` with the series ``ninEPI_bold_v12A_ZShimManual``).
5. ``series-text``: no (or a neutral) BodyPartExamined, and SeriesDescription or ProtocolName
   names a non-spine part (:data:`NON_SPINE_WORDS`) -> its class.
6. ``study-only``: only StudyDescription names a non-spine part -> None.
7. ``no-anatomy``: nothing names a non-spine body part -> None.

The keyword lists were written from the DICOM defined terms and common English/German/French
protocol wording, not fitted to any data; a protecting word wins over a vetoing one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sci_node.routing.evidence import HeaderEvidence

__all__ = ["RULES_ID", "AnatomyRule", "anatomy_from_header", "region_from_header", "SPINE_REGIONS", "normalise_text",
           "body_part_class", "mentions_spine", "names_non_spine"]

#: Version of the rules (recorded in the routing decision's rule).
RULES_ID = "body-part-v1"

#: Words (regular expressions on normalised text) that protect a series: spine, cord, neck.
SPINE_WORDS: tuple[str, ...] = (
    r"[a-z]{0,2}spine", r"spinal", r"spinalis", r"cord", r"myel\w*", r"cervical", r"cervico\w*", r"thoracic",
    r"lumbar", r"lumbo\w*", r"sacr\w*", r"coccy\w*", r"vertebr\w*", r"\w*wirbel\w*", r"hws", r"bws", r"lws",
    r"ruecken\w*", r"rucken\w*", r"neck", r"hals", r"brain ?stem", r"cranio ?cervical", r"cvj", r"rachis",
    r"moelle", r"columna", r"colonna", r"medulla",
)

#: Words that name a non-spine body part, with the anatomy class they mean.
NON_SPINE_WORDS: tuple[tuple[str, str], ...] = (
    ("brain", r"brain|head|cerebr\w*|crani\w*|skull|schaedel|schadel|kopf|gehirn|hirn|orbit\w*|pituitar\w*|"
              r"hypophys\w*|sella|iac|cerebell\w*"),
    ("abdomen", r"abdom\w*|abd|liver|hepat\w*|leber|kidney\w*|renal|niere\w*|pancrea\w*|spleen|mrcp|bauch|"
                r"pelvis|pelvic|becken|prostat\w*|rectum|rectal|uterus|ovar\w*|bladder|colon|bowel"),
    ("other", r"knee|knie|hip|huefte|shoulder|schulter|elbow|wrist|hand|finger|ankle|foot|feet|fuss|"
              r"breast|mamma|cardiac|heart|herz|thigh|femur|tibia|calf|forearm|humerus|extremit\w*"),
)

#: BodyPartExamined (normalised: upper case, letters and digits only) of regions without the spinal cord.
BODY_PARTS: dict[str, str] = {
    **{k: "brain" for k in ("HEAD", "BRAIN", "SKULL", "ORBIT", "EYE", "IAC", "EAR", "SELLA", "PITUITARY", "FACE",
                            "SINUS", "NOSE", "JAW", "TMJ", "MOUTH", "CEREBELLUM", "CEREBRUM")},
    **{k: "abdomen" for k in ("ABDOMEN", "ABDOMENPELVIS", "PELVIS", "LIVER", "KIDNEY", "PANCREAS", "SPLEEN",
                              "GALLBLADDER", "ADRENAL", "BOWEL", "COLON", "RECTUM", "BLADDER", "PROSTATE",
                              "UTERUS", "OVARY", "STOMACH")},
    **{k: "other" for k in ("KNEE", "HIP", "SHOULDER", "ELBOW", "WRIST", "HAND", "FINGER", "ANKLE", "FOOT",
                            "TOE", "ARM", "UPPERARM", "FOREARM", "LEG", "LOWERLEG", "THIGH", "FEMUR", "TIBIA",
                            "HUMERUS", "CLAVICLE", "SCAPULA", "EXTREMITY", "UPPEREXTREMITY", "LOWEREXTREMITY",
                            "BREAST", "HEART")},
}
#: BodyPartExamined values that contain the cervical spine without the word SPINE.
NECK_PARTS = ("NECK", "HEADNECK", "NECKCHEST")

_SPINE_RE = re.compile(r"\b(?:" + "|".join(SPINE_WORDS) + r")\b")
_NON_SPINE_RE = tuple((cls, re.compile(r"\b(?:" + words + r")\b")) for cls, words in NON_SPINE_WORDS)
_TRANSLIT = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "é": "e", "è": "e", "ê": "e", "à": "a"})


@dataclass(frozen=True)
class AnatomyRule:
    """Outcome of the anatomy header rules.

    Attributes
    ----------
    label : str | None
        ``brain``/``abdomen``/``other`` when the header routes the series out, else ``None``.
    rule : str
        Name of the rule that applied (``body-part``, ``spine-named``, ``incomplete`` ...).
    detail : str
        The header values that made it apply, quoted, for the job record and ``sci-node route``.
    """

    label: str | None
    rule: str
    detail: str


def normalise_text(text: str | None) -> str:
    """Lower case, umlauts transliterated, every non-alphanumeric run turned into one space."""
    if not text:
        return ""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower().translate(_TRANSLIT)).split())


def mentions_spine(text: str | None) -> bool:
    """True when free text mentions the spine, the cord or the neck (:data:`SPINE_WORDS`)."""
    return bool(_SPINE_RE.search(normalise_text(text)))


def names_non_spine(text: str | None) -> str | None:
    """Anatomy class (``brain``/``abdomen``/``other``) of the first non-spine part free text names, or None."""
    norm = normalise_text(text)
    for cls, rx in _NON_SPINE_RE:
        if rx.search(norm):
            return cls
    return None


def body_part_class(value: str | None) -> str | None:
    """``spine`` / ``brain`` / ``abdomen`` / ``other`` for a BodyPartExamined value; None = neutral or unknown."""
    if not value:
        return None
    code = _part_code(value)
    if "SPINE" in code or code in NECK_PARTS or mentions_spine(value):
        return "spine"
    return BODY_PARTS.get(code) or names_non_spine(value)


def _part_code(value: str) -> str:
    """BodyPartExamined as a defined-term code: upper case, letters and digits only (``c-spine`` -> ``CSPINE``)."""
    return re.sub(r"[^A-Z0-9]", "", value.upper())


def anatomy_from_header(ev: HeaderEvidence | None) -> AnatomyRule:
    """Apply the rules of the module docstring to ``ev``.

    Parameters
    ----------
    ev : HeaderEvidence | None
        Header evidence; only ``body_part_examined``, ``series_description``, ``protocol_name``
        and ``study_description`` are read. ``None`` = no header.

    Returns
    -------
    AnatomyRule
        ``label`` is not None only when the series should be routed out as non-spine.
    """
    fields = _fields(ev)
    if not fields:
        return AnatomyRule(None, "incomplete", "no BodyPartExamined, SeriesDescription, ProtocolName or "
                                               "StudyDescription")
    spine = [f"{k} {v!r}" for k, v in fields.items()
             if (body_part_class(v) == "spine" if k == "BodyPartExamined" else mentions_spine(v))]
    if spine:
        return AnatomyRule(None, "spine-named",
                           f"{', '.join(spine)} mentions the spine, cord or neck (the header only routes out)")
    part = fields.get("BodyPartExamined")
    part_cls = body_part_class(part)
    series = {k: v for k, v in fields.items() if k in ("SeriesDescription", "ProtocolName") and names_non_spine(v)}
    nobody = "; no header field names the spine"
    if part_cls in ("abdomen", "other"):
        return AnatomyRule(part_cls, "body-part", f"BodyPartExamined {part!r} names a non-spine body part "
                                                  f"({part_cls}){nobody}")
    if part_cls == "brain":
        if not series:
            return AnatomyRule(None, "head-uncorroborated", f"BodyPartExamined {part!r} alone (head-neck coil "
                                                            "set-ups label cervical-cord scans so)")
        said = " and ".join(f"{k} {v!r}" for k, v in series.items())
        return AnatomyRule("brain", "head-body-part", f"BodyPartExamined {part!r} and {said} name a non-spine "
                                                      f"body part (brain){nobody}")
    if series:
        key, val = next(iter(series.items()))
        cls = names_non_spine(val) or "other"
        return AnatomyRule(cls, "series-text", f"{key} {val!r} names a non-spine body part ({cls}){nobody}")
    study = fields.get("StudyDescription")
    if names_non_spine(study):
        return AnatomyRule(None, "study-only", f"StudyDescription {study!r} describes the study, not the series")
    return AnatomyRule(None, "no-anatomy", "no header field names a non-spine body part (" +
                       ", ".join(f"{k} {v!r}" for k, v in fields.items()) + ")")


def _fields(ev: HeaderEvidence | None) -> dict[str, str]:
    """The present free-text fields, by DICOM keyword, in the order the rules read them."""
    if ev is None:
        return {}
    raw = {"BodyPartExamined": ev.body_part_examined, "SeriesDescription": ev.series_description,
           "ProtocolName": ev.protocol_name, "StudyDescription": ev.study_description}
    return {k: v for k, v in raw.items() if v and normalise_text(v)}


#: BodyPartExamined defined terms (DICOM PS3.16 CID 4030) that name one spine region, and the region class.
SPINE_REGIONS: dict[str, str] = {"CSPINE": "cervical", "TSPINE": "thoracic", "LSPINE": "lumbar", "SSPINE": "lumbar"}


def region_from_header(ev: HeaderEvidence | None) -> tuple[str, str] | None:
    """``(region, detail)`` when BodyPartExamined is exactly one spine region's defined term, else None.

    CSPINE -> cervical, TSPINE -> thoracic, LSPINE and SSPINE (sacrum: the lumbar class) ->
    lumbar. Spans (``TLSPINE``, ``WHOLESPINE``, ``SPINE``) and free text decide nothing: the
    region network does. The region never changes whether a series is segmented.
    """
    value = ev.body_part_examined if ev is not None else None
    region = SPINE_REGIONS.get(_part_code(value)) if value else None
    return (region, f"BodyPartExamined {value!r} is the {region} spine (DICOM defined term)") if region else None
