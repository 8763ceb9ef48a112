"""What the CLI prints: text that may come from DICOM or a correction, made safe for a terminal.

Patient names, Series Descriptions, a correction's Content Creator Name, AE titles, UIDs as
received and the reasons built from them reach an admin's terminal through ``sci-node
corrections``, ``jobs``, ``status``, ``route`` and ``infer``. A sender controls those bytes:
``ESC [ 31 m`` (or an OSC sequence that sets the window title or writes the clipboard) would be
interpreted by the terminal. Every printing path of those commands goes through :func:`echo`
(one line of text) or :func:`echo_json` (``--json``), which escape:

* C0 controls (U+0000-U+001F: ESC, BEL, BS, CR, LF, TAB ...), DEL (U+007F) and C1 controls
  (U+0080-U+009F, CSI U+009B among them) as ``\\xNN``;
* the Unicode line and paragraph separators and the bidirectional overrides and isolates
  (U+2028, U+2029, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069), which reorder or break what
  is shown, as ``\\uNNNN``.

Printable Unicode (accented names, CJK, ...) is kept as it is. Pure functions plus two writers;
nothing here logs.
"""
from __future__ import annotations

import json
import sys
import unicodedata
from typing import Any, Iterable, TextIO

#: format characters that change how the rest of a line is shown (Trojan-source style)
_REORDERING = frozenset("\u2028\u2029\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    if unicodedata.category(ch) == "Cc":  # C0, DEL, C1
        return f"\\x{ord(ch):02x}"
    if ch in _REORDERING:
        return f"\\u{ord(ch):04x}"
    return ch


def printable(value: object) -> str:
    """``str(value)`` with every control character escaped (newlines and tabs too).

    >>> printable("Doe^Jane\\x1b[31m")
    'Doe^Jane\\\\x1b[31m'
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the usual case; False for every control, separator and format character
        return text
    return "".join(map(_escape, text))


def echo(line: object = "", out: TextIO | None = None) -> None:
    """Write one line of CLI output to ``out`` (stdout): :func:`printable` ``line``, then a newline.

    A line never contains a line break of its own: one that came with a value is shown as ``\\x0a``.
    """
    stream = out if out is not None else sys.stdout
    stream.write(printable(line) + "\n")


def echo_all(lines: Iterable[object], out: TextIO | None = None) -> None:
    """:func:`echo` each of ``lines``."""
    for line in lines:
        echo(line, out)


def echo_json(doc: Any, out: TextIO | None = None, indent: int | None = 2) -> None:
    """Write ``doc`` as JSON (``--json``): ASCII only, so every control character is a ``\\uNNNN`` escape."""
    stream = out if out is not None else sys.stdout
    stream.write(json.dumps(doc, indent=indent, default=str, ensure_ascii=True) + "\n")
