"""Reading a policy file: the schema (policies/schema.py), then each backend's options
against its kind's model (gateway/registry.py), every error by file, line and field. What
`turnout serve`, `turnout check` and every reload read a policy with."""

from __future__ import annotations

from pathlib import Path

from gateway.registry import check_options
from policies.schema import Config, parse_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a policy file (the embedded default when path is None)."""
    path = Path(path) if path else DEFAULT_CONFIG
    text = path.read_text()
    config = parse_config(text, source=str(path))
    check_options(config, text, source=str(path))
    return config
