"""Strict decoding of a received C-STORE data set under its negotiated transfer syntax.

pydicom falls back silently (a warning at most) when a data set's first element looks
like the other VR encoding: Implicit VR bytes on an Explicit VR presentation context (or the
reverse) decode "fine", while the bytes spooled under the negotiated syntax are unreadable
to every strict reader (dcmtk). sci-node therefore refuses such a data set (C-STORE
``0xC210``, see the conformance statement §3.2.4) instead of storing or re-encoding it:
the sender's encoder is broken and guessing what it meant (VRs of private elements, for
one) could store something other than what was sent.

:func:`decode_strict` is the only decoder the SCP uses: no VR-mode fallback at the top
level, and every sequence parsed, so nothing is acknowledged that cannot be read back.
"""
from __future__ import annotations

import zlib
from io import BytesIO

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from sci_node.errors import InvalidDatasetError


class EncodingMismatchError(InvalidDatasetError):
    """A data set is not encoded in the VR mode of its negotiated transfer syntax."""


def looks_implicit(data: bytes) -> bool | None:
    """Whether a little-endian data set's first element looks Implicit VR encoded (None: too short).

    The same test pydicom applies before it switches modes: in Explicit VR, bytes 4-5 of an
    element are its VR, two upper-case letters; in Implicit VR they are the low bytes of a
    32-bit length, which is never two letters for a first element shorter than 16 705 bytes.
    """
    if len(data) < 6:
        return None
    return not (0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B)


def decode_strict(raw: bytes, transfer_syntax: str) -> Dataset:
    """Decode ``raw`` (a C-STORE data set, no file meta) strictly under ``transfer_syntax``.

    Parameters
    ----------
    raw
        The data set bytes as received (deflated for Deflated Explicit VR Little Endian).
    transfer_syntax
        The presentation context's transfer syntax UID. Every storage syntax sci-node accepts
        encodes the data set in little endian; all but Implicit VR Little Endian in Explicit VR
        (encapsulated pixel data included).

    Returns
    -------
    Dataset
        Decoded with the negotiated VR mode; every sequence item parsed.

    Raises
    ------
    EncodingMismatchError
        When the data set is encoded in the other VR mode (the message names both).
    InvalidDatasetError
        When the bytes do not parse (truncated, bad lengths, deflate stream broken).
    """
    ts = UID(transfer_syntax)
    data = raw
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(raw, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InvalidDatasetError(f"deflated data set does not inflate: {exc}") from exc
    implicit = ts.is_implicit_VR
    found = looks_implicit(data)
    if found is not None and found != implicit:
        raise EncodingMismatchError(
            f"data set is encoded in {'Implicit' if found else 'Explicit'} VR, but the presentation context "
            f"negotiated {ts.name} ({ts}), which is {'Implicit' if implicit else 'Explicit'} VR")
    try:
        ds = read_dataset(BytesIO(data), implicit, ts.is_little_endian)
        _parse_sequences(ds)
    except EncodingMismatchError:
        raise
    except Exception as exc:
        raise InvalidDatasetError(f"cannot decode data set: {type(exc).__name__}: {exc}"[:300]) from exc
    return ds


def _parse_sequences(ds: Dataset) -> None:
    """Parse every sequence (pydicom reads them lazily) so that broken items fail here, not later."""
    for elem in list(ds.elements()):
        vr = elem.VR
        if vr is None:  # implicit VR: the dictionary knows
            try:
                vr = dictionary_VR(elem.tag)
            except KeyError:
                continue
        if vr == "SQ":
            for item in ds[elem.tag].value:
                _parse_sequences(item)
