"""The one exception hierarchy of sci-node.

The library raises these with messages that name the bad value; only the CLI
(:mod:`sci_node.cli`) turns them into exit codes.
"""
from __future__ import annotations


class SciNodeError(Exception):
    """Base class of every error sci-node raises on purpose."""

    exit_code: int = 1


class ConfigError(SciNodeError):
    """A configuration file, key or command-line flag is missing or invalid."""

    exit_code = 2


class InvalidSeriesError(SciNodeError):
    """A DICOM series cannot be turned into a volume (mixed geometry, duplicates, ...)."""


class InvalidDatasetError(SciNodeError):
    """A single DICOM dataset or file is corrupt or unusable."""


class ModelError(SciNodeError):
    """A model artefact is missing, corrupt or incompatible."""


class DataError(SciNodeError):
    """A training/inference data folder is empty, incomplete or inconsistent."""


class ExportError(SciNodeError):
    """Sending a result to a destination failed."""


class PermanentExportError(ExportError):
    """The destination rejected the result in a way retrying cannot fix."""


class StorageError(SciNodeError):
    """The spool or its index cannot be written (disk full, permissions, ...)."""


class JobNotFoundError(SciNodeError):
    """A job id given on the command line does not exist."""


class DicomNetworkError(SciNodeError):
    """An association could not be established or was rejected/aborted."""


class StackError(SciNodeError):
    """The embedded Orthanc + node stack could not start, or a part of it died."""


class EngineError(SciNodeError):
    """The scale-out engine (broker, payload store, workers) is misconfigured or unreachable."""


class ResultRejectedError(EngineError):
    """A worker's result is not a result of its job (wrong SOP class, study, patient or source series)."""


class CorrectionRefused(SciNodeError):
    """A radiologist's corrected SEG cannot be recorded (not a SEG, unknown source, wrong grid ...)."""


class CorrectionNotFoundError(SciNodeError):
    """A correction id given on the command line does not exist."""
