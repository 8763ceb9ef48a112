"""sci-node offline trainer: datasets, synthetic images and lesions, training loops, artefacts."""
from __future__ import annotations

from pathlib import Path

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


def read_toml_config(path: Path) -> dict:
    """Parse a training config TOML file.

    Raises
    ------
    sci_node.errors.ConfigError
        Naming the file when it is missing or not valid TOML.
    """
    import tomllib

    from sci_node.errors import ConfigError

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"training config {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"training config {str(path)!r} is not valid TOML: {exc}") from None
