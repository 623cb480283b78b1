"""Query text for CLIENT spans: sanitized (literals replaced by ``?``), with the operation
name and, for simple statements, the target table."""

from __future__ import annotations

import re
from typing import Any

_STRING = re.compile(r"'(?:[^']|'')*'|\$\$.*?\$\$", re.S)
_NUMBER = re.compile(r"(?<![\w$.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_SPACE = re.compile(r"\s+")
_IDENT = r'((?:"[^"]+"|`[^`]+`|[A-Za-z_][\w$]*)(?:\.(?:"[^"]+"|`[^`]+`|[A-Za-z_][\w$]*))?)'
_TARGET = {
    "SELECT": re.compile(r"\bFROM\s+" + _IDENT, re.I),
    "DELETE": re.compile(r"\bFROM\s+" + _IDENT, re.I),
    "INSERT": re.compile(r"\bINTO\s+" + _IDENT, re.I),
    "REPLACE": re.compile(r"\bINTO\s+" + _IDENT, re.I),
    "UPDATE": re.compile(r"^\s*UPDATE\s+" + _IDENT, re.I),
}
MAX_TEXT = 2048
#: Statements repeat: their analysis is kept for this many distinct texts.
CACHE_SIZE = 512
_cache: dict[str, tuple[str | None, str | None, str]] = {}


def query_text(statement: Any) -> str | None:
    """The statement as text (``str``, ``bytes``, psycopg ``sql.Composable``), else ``None``."""
    if isinstance(statement, str):
        return statement
    if isinstance(statement, (bytes, bytearray)):
        return bytes(statement).decode("utf-8", "replace")
    as_string = getattr(statement, "as_string", None)
    if as_string is not None:
        try:
            return str(as_string(None))
        except Exception:
            return None
    return None


def sanitize(text: str) -> str:
    """Literals replaced by ``?``, whitespace collapsed, at most 2048 characters."""
    text = _STRING.sub("?", text)
    text = _NUMBER.sub("?", text)
    text = _SPACE.sub(" ", text).strip()
    return text[:MAX_TEXT]


def describe(text: str) -> tuple[str | None, str | None]:
    """``(operation, collection)`` of a statement: the first keyword upper-cased and, for
    simple SELECT/INSERT/UPDATE/DELETE, the table; ``None`` when unknown."""
    words = text.lstrip(" \t\r\n(").split(None, 1)
    if not words:
        return None, None
    operation = words[0].upper().rstrip(";")
    if not operation.isalpha():
        return None, None
    pattern = _TARGET.get(operation)
    collection = None
    if pattern is not None:
        found = pattern.search(text)
        if found is not None:
            collection = found.group(1)
    return operation, collection


def analyse(text: str) -> tuple[str | None, str | None, str]:
    """``(operation, collection, sanitized text)``, cached per statement text."""
    found = _cache.get(text)
    if found is None:
        operation, collection = describe(text)
        found = (operation, collection, sanitize(text))
        if len(_cache) >= CACHE_SIZE:
            _cache.clear()
        _cache[text] = found
    return found
