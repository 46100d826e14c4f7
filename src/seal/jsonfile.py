"""Reading a JSON data file strictly, for every loader (SQuAD passages, teacher self-edits, ARC
tasks): one place for the checks that turn a bad file into a one-line reason.

Python's json module accepts things a data file should not contain and fails on others with
exceptions that are not JSONDecodeError: a repeated key silently keeps its last value (here an
error: nobody knows which value was meant), deep nesting raises RecursionError, an integer of
more than 4,300 digits a ValueError, and undecodable bytes a UnicodeDecodeError. A leading
byte-order mark (Windows editors) is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonFileError(ValueError):
    """The file cannot be read as JSON; the message says why, without the path (callers put
    the path in the form their error type uses)."""


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def read_json_file(path: str | Path) -> Any:
    """The JSON value in `path`; JsonFileError naming the problem ("cannot read (…)", "not
    UTF-8 (byte N)", "invalid JSON at line L column C: …", "duplicate key 'k' in one object",
    "invalid JSON: nested too deeply", …)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise JsonFileError(f"cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise JsonFileError(f"not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise JsonFileError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except _DuplicateKey as e:
        raise JsonFileError(f"duplicate key {e.args[0]!r} in one object") from None
    except RecursionError:
        raise JsonFileError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise JsonFileError(f"invalid JSON: {str(e).split(';')[0]}") from None
