"""Who may teach the model: the authenticated sender of a correction, and what makes one implausible.

A corrected SEG becomes training data only through an authenticated path (docs/corrections.md):

* ``orthanc-user:NAME`` - stored by DICOMweb STOW-RS (OHIF's "store") by Orthanc user NAME; the
  Orthanc plugin reads the user from the request that stored the instance, never from the file;
* ``dicom:AET@IP`` - sent by C-STORE from a calling AE title *and* source address listed in
  ``[corrections] dicom_senders``;
* ``cli:LOGIN`` - handed in by an admin at the node's shell (``sci-node corrections ingest``).

Anything else (a C-STORE from another AE or host, an upload without a user) is refused. The
DICOM ``ContentCreatorName`` of the SEG is kept as what the file *claims*, never as who sent it.

Plausibility flags are pure functions of the masks: arrays ``(Z, Y, X)`` uint8 on the source
series' grid, spacing ``(z, y, x)`` in mm.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from sci_node.config import CorrectionsPolicy
from sci_node.errors import CorrectionRefused

_KINDS = ("orthanc-user", "dicom", "cli")


@dataclass(frozen=True)
class Sender:
    """Who handed a correction in: ``kind`` orthanc-user | dicom | cli | none, and its name.

    ``name`` is the Orthanc user, ``AET@IP`` or the login; empty for ``none``.
    """

    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


def parse_sender(text: str | None) -> Sender:
    """``orthanc-user:NAME`` / ``dicom:AET@IP`` / ``cli:LOGIN`` -> :class:`Sender`; None or "" -> ``none``.

    Raises
    ------
    CorrectionRefused
        An unknown kind, or an empty name.
    """
    if not text:
        return Sender("none")
    kind, _, name = text.partition(":")
    if kind not in _KINDS or not name.strip() or re.search(r"[\x00-\x1f\x7f]", name):
        raise CorrectionRefused(f"sender {text!r} must be orthanc-user:NAME, dicom:AET@IP or cli:LOGIN")
    return Sender(kind, name.strip())


def authenticate(policy: CorrectionsPolicy, sender: Sender) -> str:
    """The sender as recorded (``str(sender)``) when it may hand in corrections.

    Raises
    ------
    CorrectionRefused
        Not an authenticated path, an Orthanc user outside ``[corrections] users`` (when set), or a
        DICOM sender outside ``[corrections] dicom_senders``.
    """
    if sender.kind == "cli":
        return str(sender)
    if sender.kind == "orthanc-user":
        if policy.users and sender.name not in policy.users:
            raise CorrectionRefused(f"Orthanc user {sender.name!r} is not in [corrections] users "
                                    f"{list(policy.users)}: may not hand in corrections")
        return str(sender)
    if sender.kind == "dicom":
        allowed = {str(s) for s in policy.dicom_senders}
        if sender.name not in allowed:
            raise CorrectionRefused(f"DICOM sender {sender.name} is not in [corrections] dicom_senders "
                                    f"{sorted(allowed)}: a SEG from it is not a correction")
        return str(sender)
    raise CorrectionRefused("arrived without authentication: a correction counts only when stored by DICOMweb "
                            "STOW-RS by a named Orthanc user, or sent by a DICOM AE@host in "
                            "[corrections] dicom_senders")


def mask_hash(series_uid: str, cord: np.ndarray, lesion: np.ndarray) -> str:
    """SHA-256 of the source series and both masks (as booleans): the same correction sent twice hashes alike."""
    h = hashlib.sha256(series_uid.encode())
    for arr in (cord, lesion):
        h.update(str(arr.shape).encode())
        h.update(np.packbits(np.asarray(arr) > 0).tobytes())
    return h.hexdigest()


def plausibility_flags(policy: CorrectionsPolicy, node_cord: np.ndarray, cord: np.ndarray, lesion: np.ndarray,
                       spacing_zyx: tuple[float, float, float], cord_dice: float | None) -> list[str]:
    """Why a reviewer should look twice at a correction; [] when nothing is implausible.

    Parameters
    ----------
    policy
        ``min_cord_dice``, ``neighbourhood_mm`` and ``max_outside_fraction``.
    node_cord, cord, lesion
        ``(Z, Y, X)`` masks: the node's cord, the corrected cord and lesions.
    spacing_zyx
        Voxel size in mm, ``(z, y, x)``.
    cord_dice
        Dice of the corrected cord against ``node_cord`` (None: not measured).
    """
    flags: list[str] = []
    drawn = (cord > 0) | (lesion > 0)
    if not (cord > 0).any():
        flags.append("the corrected cord is empty")
    if cord_dice is not None and cord_dice < policy.min_cord_dice:
        flags.append(f"cord Dice {cord_dice:.3f} against the node's own cord is below {policy.min_cord_dice}")
    if drawn.any() and (node_cord > 0).any():
        dist = ndi.distance_transform_edt(node_cord == 0, sampling=spacing_zyx)
        outside = float((drawn & (dist > policy.neighbourhood_mm)).sum()) / float(drawn.sum())
        if outside > policy.max_outside_fraction:
            flags.append(f"{100 * outside:.1f} % of the drawn voxels lie over {policy.neighbourhood_mm:g} mm from "
                         "the node's cord")
    if (lesion > 0).any() and (cord > 0).any():
        near = ndi.binary_dilation(cord > 0, iterations=1)
        stray = float(((lesion > 0) & ~near).sum()) / float((lesion > 0).sum())
        if stray > 0.5:
            flags.append(f"{100 * stray:.0f} % of the lesion voxels lie outside the corrected cord")
    return flags
