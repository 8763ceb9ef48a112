"""Strict decoding of a received C-STORE data set under its negotiated transfer syntax.

pydicom falls back silently (a warning at most) when a data set's first element looks
like the other VR encoding: Implicit VR bytes on an Explicit VR presentation context (or the
reverse) decode "fine", while the bytes spooled under the negotiated syntax are unreadable
to every strict reader (dcmtk). sci-node therefore refuses such a data set (C-STORE
``0xC210``, see the conformance statement §3.2.4) instead of storing or re-encoding it:
the sender's encoder is broken and guessing what it meant (VRs of private elements, for
one) could store something other than what was sent.

:func:`decode_strict` is the only decoder the SCP uses: no VR-mode fallback at the top
level, every sequence parsed, and every element's declared length checked against the bytes that
follow it (:func:`check_lengths`), so nothing is acknowledged that cannot be read back: pydicom
reads a value that claims more bytes than the data set holds as whatever is left, where dcmtk
stops with "premature end of stream". :func:`pixel_data_problem` then checks the Pixel Data
against the image header (native: Rows x Columns x Samples x Bits Allocated x Frames; encapsulated:
the fragments parse and there are enough of them for the frames).
"""
from __future__ import annotations

import struct
import zlib
from io import BytesIO

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from sci_node.errors import InvalidDatasetError

#: a value length of 0xFFFFFFFF: the value runs to its delimiter (sequences, encapsulated Pixel Data)
UNDEFINED_LENGTH = 0xFFFFFFFF
#: (FFFE,E0DD) Sequence Delimitation Item with length 0, little endian
_SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
_ITEM = (0xFFFE, 0xE000)


class EncodingMismatchError(InvalidDatasetError):
    """A data set is not encoded in the VR mode of its negotiated transfer syntax."""


class LengthError(InvalidDatasetError):
    """An element's declared value length runs past the bytes that were received."""


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
    LengthError
        When an element declares more bytes than follow it (a lying or truncated length field),
        or an undefined-length value has no delimiter.
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
        check_lengths(ds, data)
    except (EncodingMismatchError, LengthError):
        raise
    except Exception as exc:
        raise InvalidDatasetError(f"cannot decode data set: {type(exc).__name__}: {exc}"[:300]) from exc
    return ds


def check_lengths(ds: Dataset, data: bytes) -> None:
    """Check every element's declared length against ``data``, parsing every sequence on the way.

    Parameters
    ----------
    ds
        Read from ``data`` by ``read_dataset`` (its elements still raw: value positions are known).
    data
        The data set's bytes (inflated). Nested elements' positions are absolute in it.

    Raises
    ------
    LengthError
        A defined length larger than the value read (the data ran out first), or an undefined
        length whose value is not followed by a Sequence Delimitation Item (the data ran out).
    """
    for elem in list(ds.elements()):
        if isinstance(elem, RawDataElement):
            _check_raw_length(elem, data)
        vr = elem.VR
        if vr is None:  # implicit VR: the dictionary knows
            try:
                vr = dictionary_VR(elem.tag)
            except KeyError:
                continue
        if vr == "SQ":
            for item in ds[elem.tag].value:
                check_lengths(item, data)


def _check_raw_length(elem: RawDataElement, data: bytes) -> None:
    got = len(elem.value) if elem.value is not None else 0
    if elem.length != UNDEFINED_LENGTH:
        if got < elem.length:
            raise LengthError(f"element {_name(elem.tag)} declares a value length of {elem.length} bytes but only "
                              f"{got} follow in the data set (a lying or truncated length field)")
        return
    end = elem.value_tell + got
    if data[end:end + 8] != _SEQUENCE_DELIMITER:
        raise LengthError(f"element {_name(elem.tag)} has an undefined length but no Sequence Delimitation Item: the "
                          f"data set ends after {got} bytes of its value")


def _name(tag: int) -> str:
    """``(gggg,eeee) Keyword`` of an element, for a refusal's reason (built only when one is refused)."""
    return f"{Tag(tag)} {keyword_for_tag(tag) or 'private/unknown'}"


def text_value(ds: Dataset, tag: int, vr: str = "UI") -> str:
    """A top-level single-valued text element (e.g. a UID), '' when absent; pydicom's value otherwise.

    A still-raw element of the expected ``vr`` (or implicit VR) with one value is decoded from its
    bytes (ISO 8859-1 as pydicom does, NUL and space padding stripped) without pydicom's value
    conversion and validation (much of the handler's decode time). Any
    other element (another or an unknown VR, several values, already converted) goes through
    pydicom as before: ``str(value)``, and whatever pydicom raises for it propagates.
    """
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    value = elem.value
    if (isinstance(elem, RawDataElement) and elem.VR in (None, vr) and isinstance(value, (bytes, bytearray))
            and b"\\" not in value):
        return bytes(value).decode("latin-1").strip("\0 ")  # as pydicom decodes UI (its default encoding)
    return str(ds[tag].value or "").strip("\0 ")


def pixel_data_problem(ds: Dataset, transfer_syntax: str) -> str | None:
    """Why the Pixel Data cannot belong to the image header, or None.

    Native transfer syntaxes: the value length must be Rows x Columns x Samples per Pixel x
    Number of Frames x Bits Allocated / 8, rounded up to whole bytes and padded to even (PS3.5
    8.1.1). Encapsulated ones: an undefined length, items that fit, a Basic Offset Table with
    one offset per frame (when not empty), and at least one fragment per frame (PS3.5 A.4).
    """
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        if rows <= 0 or cols <= 0:
            return f"invalid matrix size Rows={rows} Columns={cols}"
        if "PixelData" not in ds:
            return "no Pixel Data"
        samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
        if samples < 1 or frames < 1:
            return f"invalid Samples per Pixel {samples} / Number of Frames {frames}"
        raw = ds.get_item("PixelData")
        length = getattr(raw, "length", None)
        value = raw.value if raw is not None else None
        if UID(transfer_syntax).is_compressed:
            if length is not None and length != UNDEFINED_LENGTH:
                return f"encapsulated Pixel Data with a defined length ({length}) under {UID(transfer_syntax).name}"
            return _fragments_problem(bytes(value or b""), frames)
        bits = int(ds.get("BitsAllocated") or 0)
        if bits not in (1, 8, 16, 32, 64):
            return f"invalid Bits Allocated {bits}"
        if length == UNDEFINED_LENGTH:
            return "native Pixel Data with an undefined length"
        expected = (rows * cols * samples * frames * bits + 7) // 8
        expected += expected % 2
        have = len(value or b"")
        if have != expected:
            return (f"Pixel Data has {have} bytes, Rows x Columns x Samples per Pixel x Bits Allocated/8 x frames "
                    f"({rows} x {cols} x {samples} x {bits}/8 x {frames}) needs {expected}")
    except Exception as exc:
        return f"unreadable image header: {type(exc).__name__}: {exc}"[:300]
    return None


def _fragments_problem(value: bytes, frames: int) -> str | None:
    """Encapsulated Pixel Data (the value up to its delimiter): Basic Offset Table, fragments, frames."""
    lengths: list[int] = []
    pos = 0
    while pos < len(value):
        if pos + 8 > len(value):
            return f"encapsulated Pixel Data: {len(value) - pos} stray bytes after the last item"
        group, element, length = struct.unpack_from("<HHL", value, pos)
        if (group, element) != _ITEM:
            return f"encapsulated Pixel Data: ({group:04X},{element:04X}) where an item (FFFE,E000) belongs"
        if length == UNDEFINED_LENGTH or pos + 8 + length > len(value):
            return (f"encapsulated Pixel Data: item {len(lengths)} declares {length} bytes, "
                    f"{len(value) - pos - 8} follow")
        lengths.append(length)
        pos += 8 + length
    if not lengths:
        return "encapsulated Pixel Data without a Basic Offset Table item"
    offsets, fragments = lengths[0] // 4, len(lengths) - 1
    if lengths[0] % 4 or (offsets and offsets != frames):
        return f"encapsulated Pixel Data: Basic Offset Table of {lengths[0]} bytes for {frames} frame(s)"
    if fragments < frames:
        return f"encapsulated Pixel Data: {fragments} fragment(s) for {frames} frame(s)"
    return None
