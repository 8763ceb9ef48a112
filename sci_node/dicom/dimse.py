"""Named DIMSE status codes and transfer syntaxes the node uses.

pynetdicom returns and accepts plain integers; these enums give the codes we rely on
a name (PS3.4 Annex B/GG and PS3.7 Annex C) so handlers and the export classifier read
as prose. Pure constants: no I/O.
"""
from __future__ import annotations

from enum import IntEnum

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

#: Verification SOP Class (C-ECHO).
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")


class Status(IntEnum):
    """C-STORE / C-ECHO response statuses used by sci-node."""

    SUCCESS = 0x0000
    #: Refused: SOP class not supported (PS3.7 C.5.1 / Annex C).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Refused: not authorised.
    NOT_AUTHORIZED = 0x0124
    #: Failure: invalid SOP instance.
    INVALID_SOP_INSTANCE = 0x0117
    #: Refused: out of resources (disk full, index unavailable).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class.
    DATASET_SOP_CLASS_MISMATCH = 0xA900
    #: Error: cannot understand (corrupt or undecodable data set).
    CANNOT_UNDERSTAND = 0xC210
    #: Warnings (the instance was stored).
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_SOP_CLASS_MISMATCH = 0xB007


#: Statuses that mean the peer stored the instance.
STORED_STATUSES = frozenset({Status.SUCCESS, Status.WARNING_COERCION,
                             Status.WARNING_ELEMENTS_DISCARDED, Status.WARNING_SOP_CLASS_MISMATCH})


def is_transient_failure(status: int) -> bool:
    """True when a failed C-STORE status may succeed on retry (0xA7xx out of resources).

    Everything else that is not a success/warning (0x01xx refused, 0x02xx, 0xA9xx
    mismatch, 0xCxxx cannot understand) is permanent: resending the same bytes cannot fix it.
    """
    return (status & 0xFF00) == 0xA700


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result field."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ source field."""

    SERVICE_USER = 0x01
    PROVIDER_ACSE = 0x02
    PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostic (meaning depends on the source)."""

    NO_REASON = 0x01
    CALLING_AE_NOT_RECOGNISED = 0x03  # source SERVICE_USER
    CALLED_AE_NOT_RECOGNISED = 0x07  # source SERVICE_USER
    LOCAL_LIMIT_EXCEEDED = 0x02  # source PROVIDER_PRESENTATION
    TEMPORARY_CONGESTION = 0x01  # source PROVIDER_PRESENTATION (same value as NO_REASON)


#: Transfer syntaxes the SCP accepts for image storage (uncompressed first: preferred).
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
