"""Model registry: ``models/<name>/<version>/`` artefacts plus ``models/registry.json``.

``registry.json`` holds, per model name, the **activation stack** (the last element is
the active version; ``rollback`` pops it) and an append-only **history** of every
add/activate/rollback. It is rewritten atomically (temp file, fsync, ``os.replace``)
under an exclusive ``flock`` on ``.registry.lock``, so a running node never reads a
half-written file. The node polls :meth:`ModelRegistry.state_token` between jobs and
reloads :meth:`ModelRegistry.load_active` when it changes (hot swap, never mid-job).

An artefact is admitted only after :func:`sci_node.models.artifact.verify_artifact` (card keys,
allowed architecture, weights checksum), a compatibility check (known model name, kind,
heads) and a load test (network rebuilt, ``weights_only`` weights loaded); otherwise a
:class:`ModelError` naming the file is raised and the registry is left untouched.
"""
from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import structlog

from sci_node.errors import ModelError
from sci_node.models.artifact import CARD, read_card, verify_artifact

if TYPE_CHECKING:
    from sci_node.models.predict_cls import Classifier
    from sci_node.models.predict_seg import Segmenter

log = structlog.get_logger(__name__)
STATE = "registry.json"
LOCK = ".registry.lock"
CLASSIFIERS = ("anatomy", "region_view", "sequence")
SEGMENTERS = ("cord", "lesion")
MODEL_NAMES = CLASSIFIERS + SEGMENTERS
EXPECTED_HEADS = {"anatomy": {"anatomy"}, "region_view": {"region", "view"}, "sequence": {"sequence"}}

__all__ = ["ModelRegistry", "ModelSet", "ModelEntry", "cli_list", "cli_add", "cli_activate", "cli_rollback"]


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a version string: numeric parts as numbers (``0.12.0`` after ``0.8.1``), others as text.

    Parameters
    ----------
    version : str
        A version such as ``"0.12.0"`` or ``"0.4.0-2p5d"``.
    """
    parts = version.replace("-", ".").split(".")
    return tuple((0, int(x)) if x.isdigit() else (1, x) for x in parts)


@dataclass(frozen=True)
class ModelEntry:
    """One registered artefact."""

    name: str
    version: str
    path: Path
    active: bool
    card: dict[str, Any]


@dataclass(frozen=True)
class ModelSet:
    """The five active models the pipeline routes and segments with."""

    anatomy: "Classifier"
    region_view: "Classifier"
    sequence: "Classifier"
    cord: "Segmenter"
    lesion: "Segmenter"
    versions: dict[str, str]
    token: str = ""


def check_compatible(card: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ModelError` when a card is not one of the node's five models."""
    name = card.get("name")
    if name not in MODEL_NAMES:
        raise ModelError(f"{where}: model name {name!r} is not one of {', '.join(MODEL_NAMES)}")
    version = str(card.get("version", ""))
    if not version or "/" in version or version.startswith("."):
        raise ModelError(f"{where}: version {version!r} is not a valid folder name")
    kind = "classifier" if name in CLASSIFIERS else "segmentation"
    if card.get("kind") != kind:
        raise ModelError(f"{where}: model {name!r} must be kind {kind!r}, the card says {card.get('kind')!r}")
    if name in EXPECTED_HEADS:
        from sci_node.models.predict_cls import check_classifier_card

        check_classifier_card(card, where)
        if set(card["heads"]) != EXPECTED_HEADS[name]:
            raise ModelError(f"{where}: {name} heads {sorted(card['heads'])} are not {sorted(EXPECTED_HEADS[name])}")


def load_model(art_dir: Path, device: str = "cpu") -> "Classifier | Segmenter":
    """Load an artefact with the wrapper of its kind (verifies the checksum again)."""
    card = read_card(art_dir)
    if card.get("kind") == "classifier":
        from sci_node.models.predict_cls import Classifier

        return Classifier.from_artifact(art_dir, device=device)
    from sci_node.models.predict_seg import Segmenter

    return Segmenter.from_artifact(art_dir, device=device)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; other values unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class ModelRegistry:
    """The artefacts under ``models_dir`` and which version of each model is active."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)

    # -- state -------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.models_dir / STATE

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"schema": 1, "stacks": {}, "history": [], "generation": 0}
        try:
            state = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelError(f"registry state {str(self.state_path)!r} is not valid JSON: {exc}") from None
        if not isinstance(state, dict) or not isinstance(state.get("stacks"), dict):
            raise ModelError(f"registry state {str(self.state_path)!r} has no 'stacks' object")
        state.setdefault("history", [])
        state.setdefault("generation", 0)
        return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Exclusive read-modify-write of the state; written back atomically on success."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.models_dir / LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read_state()
                yield state
                state["generation"] = int(state.get("generation", 0)) + 1
                state["active"] = {n: s[-1] for n, s in sorted(state["stacks"].items()) if s}
                _write_atomic(self.state_path, state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def active(self) -> dict[str, str]:
        """Model name -> active version."""
        return {n: s[-1] for n, s in sorted(self._read_state()["stacks"].items()) if s}

    def state_token(self) -> str:
        """Cheap token that changes whenever an activation changes (hash of ``registry.json``)."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return "empty"
        return hashlib.sha256(raw).hexdigest()[:16]

    # -- queries -------------------------------------------------------------------------------
    def path_of(self, name: str, version: str) -> Path:
        return self.models_dir / name / version

    def list(self) -> list[ModelEntry]:
        """Every artefact folder with a card, sorted by name then version (cards are not checksummed here)."""
        active = self.active()
        out = []
        for card_path in sorted(self.models_dir.glob(f"*/*/{CARD}"),
                                key=lambda c: (c.parent.parent.name, version_key(c.parent.name))):
            art = card_path.parent
            try:
                card = read_card(art)
            except ModelError as exc:
                log.warning("unreadable model card", path=str(card_path), error=str(exc))
                continue
            out.append(ModelEntry(art.parent.name, art.name, art, active.get(art.parent.name) == art.name, card))
        return out

    # -- changes -------------------------------------------------------------------------------
    def add(self, art_dir: Path, activate: bool = False) -> ModelEntry:
        """Verify, load-test and copy an artefact into ``models_dir/<name>/<version>/``.

        Raises
        ------
        ModelError
            Corrupt or incompatible artefact (message names the file), or a different
            artefact already registered under the same name and version.
        """
        art_dir = Path(art_dir)
        card = verify_artifact(art_dir)
        check_compatible(card, str(art_dir / CARD))
        load_model(art_dir)
        name, version = str(card["name"]), str(card["version"])
        dest = self.path_of(name, version)
        if dest.resolve() != art_dir.resolve():
            if dest.exists():
                old = read_card(dest)
                if old.get("weights_sha256") != card["weights_sha256"]:
                    raise ModelError(f"{name} {version} is already registered at {str(dest)!r} with other weights; "
                                     "give the new artefact a new version")
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.parent / f".{version}.{uuid.uuid4().hex}.tmp"
                shutil.copytree(art_dir, tmp)
                verify_artifact(tmp)
                os.replace(tmp, dest)
        with self._locked() as state:
            state["history"].append({"time": time.time(), "action": "add", "name": name, "version": version})
        log.info("model added", name=name, version=version, path=str(dest))
        if activate:
            self.activate(name, version)
        return ModelEntry(name, version, dest, self.active().get(name) == version, card)

    def activate(self, name: str, version: str) -> None:
        """Make ``name`` ``version`` active (verified and load-tested first; the old one stays active on error)."""
        path = self.path_of(name, version)
        if not (path / CARD).is_file():
            known = sorted((p.parent.name for p in (self.models_dir / name).glob(f"*/{CARD}")),
                           key=version_key) if name else []
            raise ModelError(f"no registered model {name!r} version {version!r} (known: {', '.join(known) or 'none'})")
        card = verify_artifact(path)
        check_compatible(card, str(path / CARD))
        load_model(path)
        with self._locked() as state:
            stack = state["stacks"].setdefault(name, [])
            previous = stack[-1] if stack else None
            if previous != version:
                stack.append(version)
            state["history"].append({"time": time.time(), "action": "activate", "name": name, "version": version,
                                     "previous": previous})
        log.info("model activated", name=name, version=version, previous=previous)

    def rollback(self, name: str) -> str:
        """Re-activate the version that was active before the current one; return it."""
        with self._locked() as state:
            stack = state["stacks"].get(name, [])
            if len(stack) < 2:
                raise ModelError(f"cannot roll back {name!r}: no earlier activation "
                                 f"(active: {stack[-1] if stack else 'none'})")
            current = stack.pop()
            target = stack[-1]
            tpath = self.path_of(name, target)
            verify_artifact(tpath)
            state["history"].append({"time": time.time(), "action": "rollback", "name": name, "version": target,
                                     "previous": current})
        log.info("model rolled back", name=name, version=target, previous=current)
        return target

    def load_active(self, device: str = "cpu") -> ModelSet:
        """Load the five active models (each verified and rebuilt from its folder).

        Raises
        ------
        ModelError
            A model has no active version or its artefact is corrupt.
        """
        token = self.state_token()
        active = self.active()
        missing = [n for n in MODEL_NAMES if n not in active]
        if missing:
            raise ModelError(f"no active version of {', '.join(missing)} in {str(self.state_path)!r}")
        return self.load_versions(active, device=device, token=token)

    def load_versions(self, versions: Mapping[str, str], device: str = "cpu", token: str = "") -> ModelSet:
        """Load the five models at the given versions, active or not (a worker runs what a task names).

        Raises
        ------
        ModelError
            A version is not registered here or its artefact is corrupt.
        """
        device = resolve_device(device)
        missing = [n for n in MODEL_NAMES if n not in versions]
        if missing:
            raise ModelError(f"no version given for {', '.join(missing)}")
        models = {n: load_model(self.path_of(n, str(versions[n])), device=device) for n in MODEL_NAMES}
        return ModelSet(versions={n: str(versions[n]) for n in MODEL_NAMES}, token=token,
                        **models)  # type: ignore[arg-type]

    def fingerprint(self, versions: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
        """``{name: {"version": v, "weights_sha256": h}}`` of ``versions`` (default: the active ones).

        Read from the cards (the weights are checksummed again when loaded). A version that is
        not registered here has ``weights_sha256`` ``""``.
        """
        versions = self.active() if versions is None else versions
        out: dict[str, dict[str, str]] = {}
        for name, version in sorted(versions.items()):
            try:
                sha = str(read_card(self.path_of(name, str(version))).get("weights_sha256", ""))
            except ModelError:
                sha = ""
            out[name] = {"version": str(version), "weights_sha256": sha}
        return out

    def missing_from(self, wanted: Mapping[str, Mapping[str, str]]) -> "builtins.list[str]":
        """What of a :meth:`fingerprint` this registry lacks: ``["cord 0.2.1 (not registered)", ...]``."""
        have = self.fingerprint({n: str(w.get("version", "")) for n, w in wanted.items()})
        out = []
        for name, want in sorted(wanted.items()):
            got = have[name]["weights_sha256"]
            if not got:
                out.append(f"{name} {want.get('version')} (not registered)")
            elif got != want.get("weights_sha256"):
                out.append(f"{name} {want.get('version')} (other weights: {got[:12]} here, "
                           f"{str(want.get('weights_sha256'))[:12]} wanted)")
        return out


# -- CLI presenters (return exit codes; the CLI maps ModelError itself) ---------------------------

def _metric_summary(card: Mapping[str, Any]) -> str:
    metrics = card.get("metrics") or {}
    parts = []
    scheme = "CV" if "fold" in str(metrics.get("validation", "")) else "LOSO"
    for head in card.get("heads") or {}:
        m = metrics.get(head) or {}
        if m.get("accuracy") is not None:
            parts.append(f"{head} {scheme} acc {m['accuracy']:.3f} "
                         f"(real {m.get('accuracy_real') or 0:.3f}, n={m.get('n')})")
            series = (m.get("real_series") or {}).get("as_available") or {}
            if series.get("accuracy") is not None:
                parts[-1] += f", real series {series['accuracy']:.3f} (n={series['n']})"
    if not parts:  # segmentation: LOSO Dice (and lesion-wise F1) first, then the rest
        first = [k for k in ("dice_mean", "dice_min", "lesion_f1_mean") if k in metrics]
        for key in first + [k for k in metrics if k not in first]:
            val = metrics[key]
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                parts.append(f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}")
    return "; ".join(parts[:4]) or "-"


def cli_list(reg: ModelRegistry, as_json: bool = False) -> int:
    """Print every registered model version, which is active, and its validation metrics."""
    entries = reg.list()
    if as_json:
        rows = [{"name": e.name, "version": e.version, "active": e.active, "path": str(e.path),
                 "metrics": e.card.get("metrics", {}), "created": e.card.get("created")} for e in entries]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    if not entries:
        sys.stdout.write(f"no models registered in {reg.models_dir}\n")
        return 0
    sys.stdout.write(f"{'NAME':<12} {'VERSION':<10} {'ACTIVE':<6} VALIDATION\n")
    for e in entries:
        sys.stdout.write(f"{e.name:<12} {e.version:<10} {'*' if e.active else '':<6} {_metric_summary(e.card)}\n")
    return 0


def cli_add(reg: ModelRegistry, path: Path, activate: bool = False) -> int:
    entry = reg.add(path, activate=activate)
    sys.stdout.write(f"registered {entry.name} {entry.version}{' (active)' if activate else ''}\n")
    return 0


def cli_activate(reg: ModelRegistry, name: str, version: str) -> int:
    reg.activate(name, version)
    sys.stdout.write(f"{name} {version} is active\n")
    return 0


def cli_rollback(reg: ModelRegistry, name: str) -> int:
    version = reg.rollback(name)
    sys.stdout.write(f"{name} rolled back to {version}\n")
    return 0
