"""sci-node offline trainer: datasets, synthetic images and lesions, training loops, artefacts."""
from __future__ import annotations

__version__ = "0.1.0"


def git_commit() -> str:
    """The repository's HEAD commit (recorded in model cards), or ``"unknown"`` outside a checkout."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
