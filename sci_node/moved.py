"""Old module names that still import: each is an alias of the module that replaced it.

The package was regrouped into wings (docs/architecture.md). Code written before that names
modules by their old paths: the ``python -m trainer.X`` commands that the docs, model cards
and training configs record, bench/ scripts, and branches still in flight. :data:`MOVED` maps
each old name to its new home, and :func:`install_aliases` makes the old name import as the
*same* module object (one entry in ``sys.modules`` under both names), so a patch through either
name reaches the same code, and ``python -m OLD`` runs the new module as ``__main__``.

Why a table rather than a stub file at each old path: a file at the old path would stop git
from seeing the move as a rename, and edits made elsewhere to the old file would then not
follow it to its new place when branches merge. No code in this repository imports an old
name (a test checks that); new code uses the new paths.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from types import CodeType, ModuleType

#: old module name -> new module name, for ``sci_node`` (the trainer keeps its own table).
MOVED: dict[str, str] = {
    "sci_node.admin": "sci_node.cli.admin",
    "sci_node.anatomy_rules": "sci_node.routing.anatomy_rules",
    "sci_node.artifact": "sci_node.models.artifact",
    "sci_node.batch": "sci_node.pipeline.batch",
    "sci_node.cls_features": "sci_node.routing.cls_features",
    "sci_node.completion": "sci_node.dicom.completion",
    "sci_node.contrast_rules": "sci_node.routing.contrast_rules",
    "sci_node.corrections_cli": "sci_node.cli.corrections",
    "sci_node.decoding": "sci_node.dicom.decoding",
    "sci_node.dimse": "sci_node.dicom.dimse",
    "sci_node.engine.store": "sci_node.engine.redis_store",
    "sci_node.evidence": "sci_node.routing.evidence",
    "sci_node.export": "sci_node.dicom.export",
    "sci_node.gate": "sci_node.dicom.gate",
    "sci_node.header_rules": "sci_node.routing.header_rules",
    "sci_node.measure": "sci_node.imaging.measure",
    "sci_node.node": "sci_node.app.node",
    "sci_node.postprocess": "sci_node.imaging.postprocess",
    "sci_node.predict_cls": "sci_node.models.predict_cls",
    "sci_node.predict_seg": "sci_node.models.predict_seg",
    "sci_node.preprocess": "sci_node.imaging.preprocess",
    "sci_node.registry": "sci_node.models.registry",
    "sci_node.retention": "sci_node.app.retention",
    "sci_node.route_report": "sci_node.pipeline.route_report",
    "sci_node.scp": "sci_node.dicom.scp",
    "sci_node.scu": "sci_node.dicom.scu",
    "sci_node.seg_writer": "sci_node.pipeline.seg_writer",
    "sci_node.series": "sci_node.pipeline.series",
    "sci_node.sqlite_tx": "sci_node.store.transactions",
    "sci_node.sr_writer": "sci_node.pipeline.sr_writer",
    "sci_node.stack": "sci_node.app.stack",
    "sci_node.worker": "sci_node.engine.local",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the already-imported new module; gives ``runpy`` the new module's code."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the new module ran under its own name); give it back its own ``__spec__``,
        which the import system replaced with the alias's."""
        module.__spec__ = self._spec

    def get_code(self, fullname: str) -> CodeType | None:
        """``python -m OLD``: the new module's code (run as ``__main__``, as before the move)."""
        spec = importlib.util.find_spec(self.target)
        loader = spec.loader if spec is not None else None
        if not isinstance(loader, importlib.abc.InspectLoader):
            raise ImportError(f"{self.target} (the new home of {fullname}) has no loadable code")
        return loader.get_code(self.target)


class AliasFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder for the old names in ``moved`` (consulted after the normal finders)."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        new = self.moved.get(fullname)
        if new is None:
            return None
        new_spec = importlib.util.find_spec(new)
        origin = new_spec.origin if new_spec is not None else None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), origin=origin)


def install_aliases(moved: Mapping[str, str]) -> None:
    """Make every old name in ``moved`` import as its new module (idempotent per table)."""
    if not any(isinstance(f, AliasFinder) and f.moved == dict(moved) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder(moved))
