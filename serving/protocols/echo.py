"""Request fields quoted in error messages, cut short. A status message travels in gRPC's trailing
metadata, whose size is limited (8 KiB by default): a message that quoted a 20 KB model name in full
would turn a NOT_FOUND into RESOURCE_EXHAUSTED, and the caller would never learn what was wrong.
"""

from __future__ import annotations

LIMIT = 200  # characters of a field quoted in a message


def echo(value: str | bytes | float | None) -> str:
    """A request field (a name, a datatype, a parameter's value) as repr() shows it, or its first
    LIMIT characters and how long the whole was."""
    if isinstance(value, str | bytes) and len(value) > LIMIT:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:LIMIT]!r}... ({len(value)} {unit} in all)"
    return repr(value)
