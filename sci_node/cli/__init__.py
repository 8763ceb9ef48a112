"""The command line: ``sci-node`` (:mod:`sci_node.cli.main`) and the presenters its commands print through.

Top of the package: may import any wing, each lazily in the handler that needs it.
"""
from __future__ import annotations

from sci_node.cli.main import build_parser, entrypoint, main

__all__ = ["build_parser", "entrypoint", "main"]
