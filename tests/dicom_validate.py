"""Test helper: run dicom3tools' ``dciodvfy`` on a file and collect its error lines."""
from __future__ import annotations

import subprocess
from pathlib import Path


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of ``dciodvfy path`` output that report an error (warnings are not errors).

    dciodvfy prints to stderr; a line starting with "Error" is a standard violation.
    """
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert text.strip(), f"dciodvfy printed nothing for {path}"
    return [line for line in text.splitlines() if line.lstrip().startswith("Error")]
