"""What the `options:` classes of local backends share: unknown keys are an error that names them."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def reject_unknown(cls: type, options: dict[str, Any], kind: str) -> None:
    """Raise ValueError naming the options `cls` (a dataclass) does not have."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {kind} backend option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
