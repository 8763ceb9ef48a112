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
    _route_stdlib_logging(shared, renderer)
    # pynetdicom is chatty at INFO (it logs every PDU summary); keep it (and pydicom) at WARNING.
    for name in ("pynetdicom", "pydicom", "py.warnings"):
        logging.getLogger(name).setLevel(logging.WARNING if lvl <= logging.INFO else lvl)


class _StderrHandler(logging.Handler):
    """A stdlib handler that prints through structlog's :class:`~structlog.PrintLogger`: the same
    (current) ``sys.stderr`` and the same per-file lock, so concurrent lines never interleave."""

    _ours = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _stderr_logger().msg(self.format(record))
        except Exception:
            self.handleError(record)


def _route_stdlib_logging(shared: list[structlog.types.Processor], renderer: structlog.types.Processor) -> None:
    """Render stdlib records (pynetdicom, pydicom, ``warnings``) with our processors: one format,
    JSON lines in production. Replaces the handler an earlier call installed; others are kept."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_ours", False)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # pydicom reports most decoding problems with warnings.warn


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger (bound with ``logger=name`` when given)."""
    log = structlog.get_logger()
    return log.bind(logger=name) if name else log
