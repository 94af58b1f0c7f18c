"""Reading the JSON files fastlm and Hugging Face write, with errors that name the file and the field.

A run directory, a checkpoint, the token cache and a Hugging Face checkpoint all keep their
descriptions in JSON objects. A damaged one (truncated, edited into a list, a field of the
wrong type) is reported as such, against that file, in the error class of whoever reads it,
instead of as a ``KeyError`` or ``AttributeError`` from deep inside.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file when it is missing, unreadable, not JSON
    (a truncated write) or not an object."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise error(f"{path} is not valid JSON (truncated or damaged?): {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, got {_kind(value)}")
    return value


def require(obj: dict[str, Any], path: Path, fields: dict[str, type | tuple[type, ...]],
            error: type[Exception] = ValueError) -> None:
    """Each of ``fields`` present in ``obj`` (read from ``path``) with its type; ``error`` naming the first
    that is not. ``bool`` is not accepted as an ``int``."""
    for name, kind in fields.items():
        if name not in obj:
            raise error(f"{path} lacks {name}")
        value = obj[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = " or ".join(_kind(k()) for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise error(f"{path}: {name} must be {expected}, got {value!r}")


def content_sha256(obj: Any) -> str:
    """A hash of a JSON value's content, the same however the file holding it is formatted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
