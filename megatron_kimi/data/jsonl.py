"""Reading jsonl line by line: a bad line is an error naming ``PATH:LINE`` or a counted skip.

Every jsonl reader (the LM corpus, SFT chat data, RL prompts) decodes a line with :func:`decode_line`
(raw bytes -> JSON value; ``ValueError`` for non-UTF-8 bytes or malformed JSON, which includes a
truncated last line) and, when it reads a whole file in one process, iterates with
:func:`read_jsonl`. ``on_error`` (the config's ``data.on_error``) chooses what a bad line does:
``"raise"`` stops at the first one with ``ValueError("PATH:LINE: reason")``; ``"skip"`` leaves it
out and counts it in a :class:`BadLines` report, which the command prints (and the SFT cache keeps
in its stats). Blank lines are not records and are skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

ON_ERROR: tuple[str, ...] = ("raise", "skip")
MAX_REPORTED = 100  # skipped lines listed with their line number and reason

T = TypeVar("T")


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")


@dataclass
class BadLines:
    """Lines skipped under ``on_error="skip"``: the count and the first :data:`MAX_REPORTED`."""

    path: str
    count: int = 0
    lines: list[dict] = field(default_factory=list)  # {"line": n, "error": reason}

    def add(self, lineno: int, reason: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_REPORTED:
            self.lines.append({"line": lineno, "error": reason})

    def summary(self) -> str:
        if not self.count:
            return f"{self.path}: no bad lines"
        first = self.lines[0]
        return (f"{self.path}: skipped {self.count} bad line(s) (data.on_error=skip); first at line "
                f"{first['line']}: {first['error']}")


def decode_line(raw: bytes) -> Any:
    """One jsonl line (bytes, with or without its newline) -> its JSON value."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = "" if raw.endswith(b"\n") else " (the file ends inside this line: truncated?)"
        raise ValueError(f"malformed JSON: {e.msg} (column {e.colno}){hint}") from None


def read_jsonl(path: str | Path, parse: Callable[[Any], T], on_error: str = "raise",
               bad: BadLines | None = None) -> Iterator[tuple[int, T]]:
    """Yield ``(line number, parse(value))`` for every non-blank line of ``path``.

    ``parse`` turns the JSON value into a record and raises ``ValueError(reason)`` for a bad one
    (wrong type, missing field); the reason is prefixed with ``PATH:LINE:``. With ``on_error="skip"``
    bad lines are counted in ``bad`` (required then) and left out.
    """
    check_on_error(on_error)
    if on_error == "skip" and bad is None:
        raise ValueError("read_jsonl(on_error='skip') needs a BadLines to count the skipped lines in")
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = parse(decode_line(raw))
            except ValueError as e:
                if on_error == "raise":
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                bad.add(lineno, str(e))  # type: ignore[union-attr]
                continue
            yield lineno, value
