"""The DICOM file header (preamble, ``DICM``, File Meta Information) of a received instance, built by hand.

The spool stores each instance as the bytes the peer sent behind a file meta header. pynetdicom's
``Event.encoded_dataset()`` builds that header through a pydicom ``FileMetaDataset`` and its
writer (about a tenth of the C-STORE handler's time); :func:`file_header` writes the same bytes
directly: explicit VR little endian, the seven elements pynetdicom's ``create_file_meta`` sets, in
tag order, UIDs padded with NUL and the version name with a space to even length
(PS3.10 §7.1). ``tests/test_store.py`` checks it is byte-identical to pynetdicom's.
"""
from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

#: 128-byte preamble (zeros) and the ``DICM`` prefix.
PREAMBLE = b"\x00" * 128 + b"DICM"
#: (0002,0001) File Meta Information Version ``00 01`` (OB: 2 reserved bytes, 4-byte length).
_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def _short(element: int, vr: bytes, value: str, pad: bytes) -> bytes:
    """One group-2 element with a 2-byte length field (UI, SH, UL's VRs), padded to even length."""
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(raw)) + raw


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information for a data set received under ``transfer_syntax``.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid
        The C-STORE request's Affected SOP Class / Instance UIDs.
    transfer_syntax
        The presentation context's transfer syntax (the data set's bytes follow the header as sent).

    Returns
    -------
    bytes
        What ``pynetdicom.events.Event.encoded_dataset()`` puts in front of the data set.
    """
    body = b"".join((
        _VERSION,
        _short(0x0002, b"UI", sop_class_uid, b"\x00"),
        _short(0x0003, b"UI", sop_instance_uid, b"\x00"),
        _short(0x0010, b"UI", transfer_syntax, b"\x00"),
        _short(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID, b"\x00"),
        _short(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION, b" "),
    ))
    return PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body
