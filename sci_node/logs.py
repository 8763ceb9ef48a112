"""structlog, configured once per process.

JSON lines in production, a console renderer on a TTY. Context (``calling_aet``,
``study_uid``, ``series_uid``, ``job_id``) is bound through contextvars by the SCP
and the worker. INFO-level lines carry UIDs and AE titles only, never patient data.
"""
from __future__ import annotations

import logging
import sys

import structlog

from sci_node.config import LogFormat


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    """A logger on the *current* ``sys.stderr`` (looked up per logger, not frozen at configure time,
    so a replaced stream, e.g. under pytest capture, is followed)."""
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(fmt: LogFormat | str = LogFormat.AUTO, level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger (pynetdicom logs through it).

    Parameters
    ----------
    fmt
        ``auto`` (console on a TTY, JSON otherwise), ``json`` or ``console``.
    level
        Minimum level name, e.g. ``"INFO"``.
    """
    fmt = LogFormat(fmt)
    use_console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and sys.stderr.isatty())
    lvl = logging.getLevelName(level.upper())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    # pynetdicom is chatty at INFO (it logs every PDU summary); keep it at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if lvl <= logging.INFO else lvl)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger (bound with ``logger=name`` when given)."""
    log = structlog.get_logger()
    return log.bind(logger=name) if name else log
