"""Self-describing model artefacts: ``models/<name>/<version>/{weights.pt,card.json}``.

``weights.pt`` is a plain ``state_dict`` (tensors only) written with :func:`torch.save`
and read back with ``torch.load(weights_only=True)``. ``card.json`` carries everything
needed to rebuild and use the network without any other file:

``name``, ``version``, ``kind`` (``"segmentation"`` | ``"classifier"``),
``architecture`` ``{"class": <allow-listed dotted name>, "args": {...}}``,
``preprocessing`` (spacing, orientation, normalisation, patch/slab size ...),
``labels`` (list of ``{"value", "name", "snomed": {"code", "meaning", "scheme"}}``),
``metrics`` (validation numbers), ``data_hash``, ``training`` (config, command, seed,
epochs, splits), ``trainer_version``, ``git_commit``, ``created``, and
``weights_sha256`` (the checksum of ``weights.pt``).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from sci_node.errors import ModelError

if TYPE_CHECKING:  # torch is imported lazily: the CLI's fast paths never need it
    import torch

WEIGHTS = "weights.pt"
CARD = "card.json"
REQUIRED_CARD_KEYS = ("name", "version", "kind", "architecture", "preprocessing", "labels",
                      "metrics", "data_hash", "weights_sha256")
#: Network classes a card may name. Anything else is refused (no arbitrary imports).
ALLOWED_ARCH_PREFIXES = ("monai.networks.nets.", "sci_node.nets.")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(out_dir: Path, state_dict: Mapping[str, "torch.Tensor"], card: Mapping[str, Any]) -> Path:
    """Write ``weights.pt`` and ``card.json`` (with ``weights_sha256`` filled in) to ``out_dir``.

    Returns the artefact folder. The card is written last, atomically, so a folder with a
    card always has complete weights.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, out_dir / WEIGHTS)
    return write_card(out_dir, card)


def write_card(art_dir: Path, card: Mapping[str, Any]) -> Path:
    """(Re)write ``card.json`` of an artefact folder whose ``weights.pt`` is in place.

    ``weights_sha256`` is filled in from the weights file; the card is replaced atomically.
    Used after new weights (:func:`write_artifact`) and to update a card alone (re-scoring).

    Raises
    ------
    ModelError
        A required card key is missing.
    """
    art_dir = Path(art_dir)
    full = dict(card)
    full["weights_sha256"] = sha256_file(art_dir / WEIGHTS)
    missing = [k for k in REQUIRED_CARD_KEYS if k not in full]
    if missing:
        raise ModelError(f"model card for {art_dir} lacks {', '.join(missing)}")
    tmp = art_dir / (CARD + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, art_dir / CARD)
    return art_dir


def read_card(art_dir: Path) -> dict[str, Any]:
    """Read and check ``card.json`` of an artefact folder (keys only, not weights)."""
    path = Path(art_dir) / CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model artefact {str(art_dir)!r} has no {CARD}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model card {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise ModelError(f"model card {str(path)!r} is not a JSON object")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ModelError(f"model card {str(path)!r} lacks {', '.join(missing)}")
    arch = card["architecture"]
    if not isinstance(arch, dict) or not str(arch.get("class", "")).startswith(ALLOWED_ARCH_PREFIXES):
        raise ModelError(f"model card {str(path)!r}: architecture class {arch!r} is not allowed")
    return card


def verify_artifact(art_dir: Path) -> dict[str, Any]:
    """Check card keys and the weights checksum; return the card.

    Raises
    ------
    ModelError
        Missing files, bad JSON, disallowed architecture or checksum mismatch.
    """
    card = read_card(art_dir)
    wpath = Path(art_dir) / WEIGHTS
    if not wpath.is_file():
        raise ModelError(f"model artefact {str(art_dir)!r} has no {WEIGHTS}")
    actual = sha256_file(wpath)
    if actual != card["weights_sha256"]:
        raise ModelError(f"model artefact {str(art_dir)!r}: {WEIGHTS} checksum {actual[:12]}… "
                         f"does not match the card's {str(card['weights_sha256'])[:12]}…")
    return card


def build_network(card: Mapping[str, Any]) -> "torch.nn.Module":
    """Instantiate the (untrained) network a card describes."""
    arch = card["architecture"]
    cls_path = str(arch["class"])
    if not cls_path.startswith(ALLOWED_ARCH_PREFIXES):
        raise ModelError(f"architecture class {cls_path!r} is not allowed")
    module_name, _, cls_name = cls_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        return cls(**arch.get("args", {}))
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ModelError(f"cannot build {cls_path} with {arch.get('args')!r}: {exc}") from None


def _inference_network(card: Mapping[str, Any]) -> "torch.nn.Module":
    """:func:`build_network`, except that a ``monai.networks.nets.UNet`` whose arguments
    :class:`~sci_node.nets.unet.CompatUNet` reproduces is built as that class: same module names
    and outputs, without importing MONAI (about a second of every cold start). The trainer builds
    (and so trains) with :func:`build_network` unchanged."""
    arch = card["architecture"]
    if str(arch.get("class")) == "monai.networks.nets.UNet":
        from sci_node.nets.unet import CompatUNet, compatible

        if compatible(arch.get("args", {})):
            return CompatUNet(**arch.get("args", {}))
    return build_network(card)


def load_network(art_dir: Path, device: str = "cpu") -> tuple["torch.nn.Module", dict[str, Any]]:
    """Verify an artefact, rebuild its network, load the weights (``weights_only=True``).

    Returns the network in eval mode on ``device`` and its card.
    """
    import torch

    card = verify_artifact(art_dir)
    net = _inference_network(card)
    try:
        state = torch.load(Path(art_dir) / WEIGHTS, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise ModelError(f"weights of {str(art_dir)!r} do not fit {card['architecture']['class']}: {exc}") from None
    return net.to(device).eval(), card
