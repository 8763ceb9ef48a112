"""DICOM in and out: the SCP and its gate, strict decoding, status codes, series completion, the SCU and export.

Imports the core and store/ (the spool, jobs and outbox it fills and drains); never models/, torch or highdicom.
"""
