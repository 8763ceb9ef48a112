"""sci-node offline trainer: datasets, synthetic images and lesions, training loops, artefacts.

``classify/`` trains the three classifiers, ``segment/`` the cord and lesion segmenters, ``studies/``
reproduces the docs' measurements; ``cli`` adds ``sci-node train`` to the node's command line.
The trainer imports the node (its preprocessing, artefact format and networks), never the reverse.
"""
from __future__ import annotations

from pathlib import Path

from sci_node.moved import install_aliases
from trainer.moved import MOVED

__version__ = "0.1.0"

install_aliases(MOVED)  # old module paths (before classify/, segment/, studies/) still import: see trainer.moved


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


def read_toml_config(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Parse a training config TOML file, with its ``base`` config merged under it.

    A top-level ``base = "other.toml"`` (relative to this file) names a config this one
    changes: its tables are read first and this file's keys replace theirs, table by table
    (a list or a value replaces the base's whole; a table is merged key by key). Chains of
    bases are allowed; the merged dict has no ``base`` key and records the chain under
    ``_bases`` (nearest first) for the model card.

    Raises
    ------
    sci_node.errors.ConfigError
        Naming the file when it is missing, not valid TOML, or its ``base`` is not a string or
        forms a cycle.
    """
    import tomllib

    from sci_node.errors import ConfigError

    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"training config {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"training config {str(path)!r} is not valid TOML: {exc}") from None
    if "base" not in cfg:
        return cfg
    base = cfg.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"training config {str(path)!r}: base must be a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"training config {str(path)!r}: base {base!r} forms a cycle")
    merged = _merge(read_toml_config(base_path, (*_seen, path.resolve())), cfg)
    merged["_bases"] = [str(base_path), *merged.get("_bases", [])]
    return merged


def _merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s keys on top; tables merge recursively, anything else is replaced."""
    out = dict(base)
    for key, val in over.items():
        out[key] = _merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out
