"""A/B experiments: split one model alias across variants by weight, sticky per caller,
and mirror a sample of traffic to shadow variants.

Pure: assignment hashes (experiment name, sticky value) with blake2b, so the same caller
gets the same variant in every gateway process and after restarts, with no shared state.
Shadow sampling takes its uniform draw from the caller (an injected RNG or `unit_hash`).

`ExperimentConfig` / `VariantConfig` are the policy file's `experiments:` section; schema.py
imports them. The runtime `Experiment` is a plain dataclass built from a validated config.

Policy file shape::

    experiments:
      - name: smollm-runner-vs-paged      # used in logs, metrics and `turnout ab report`
        model: smollm2-135m               # the alias it splits
        sticky_by: user                   # key (API key) | user (body field) | header | none
        header: x-session-id              # only with sticky_by: header
        shadow_sample: 0.1                # fraction of requests mirrored to shadow variants
        variants:
          - {name: control, backends: [local], weight: 90}
          - {name: paged, backends: [gpu-node], weight: 10}
          - {name: candidate, backends: [vllm-node], shadow: true}
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StickyBy = Literal["key", "user", "header", "none"]

# ---------------------------------------------------------------------------
# Policy-file models
# ---------------------------------------------------------------------------


class VariantConfig(BaseModel):
    """One arm of an experiment: a pool of backends and its share of live traffic."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    backends: list[str] = Field(min_length=1)
    # Relative share of live traffic; None = 1 for a live variant, 0 for a shadow one.
    weight: float | None = Field(default=None, ge=0)
    # A shadow variant takes no live traffic: it gets copies of a sample of requests and its
    # answers are discarded (measured only).
    shadow: bool = False

    @model_validator(mode="after")
    def _shadow_has_no_weight(self) -> VariantConfig:
        if self.shadow and self.weight:
            raise ValueError(f"variant {self.name!r} is a shadow variant: it takes no live traffic, so leave out its weight")
        return self

    def live_weight(self) -> float:
        """The weight used for live assignment."""
        if self.shadow:
            return 0.0
        return 1.0 if self.weight is None else self.weight


class ExperimentConfig(BaseModel):
    """An experiment over one model alias."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    model: str = Field(min_length=1)
    sticky_by: StickyBy = "key"
    header: str | None = None
    shadow_sample: float = Field(default=0.0, ge=0.0, le=1.0)
    enabled: bool = True
    variants: list[VariantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique within an experiment: {dupes}")
        if not any(v.live_weight() > 0 for v in self.variants):
            raise ValueError("at least one variant must take live traffic (a non-shadow variant with weight > 0)")
        if self.sticky_by == "header" and not self.header:
            raise ValueError("sticky_by: header needs `header:` (the request header to hash)")
        if self.header and self.sticky_by != "header":
            raise ValueError("`header:` is only used with sticky_by: header")
        if self.shadow_sample > 0 and not any(v.shadow for v in self.variants):
            raise ValueError("shadow_sample > 0 but no variant has shadow: true")
        return self


def validate_experiments(
    experiments: Sequence[ExperimentConfig], backend_names: Iterable[str], aliases: Iterable[str]
) -> None:
    """Cross-section checks schema.Config runs: backends exist, aliases exist, one
    experiment per alias, unique names. Raises ValueError naming the experiment."""
    known_backends, known_aliases = set(backend_names), set(aliases)
    seen_names: set[str] = set()
    seen_models: dict[str, str] = {}
    for exp in experiments:
        if exp.name in seen_names:
            raise ValueError(f"experiment names must be unique: {exp.name!r}")
        seen_names.add(exp.name)
        if exp.model not in known_aliases:
            raise ValueError(f"experiment {exp.name!r} splits model {exp.model!r}, which no route or backend serves")
        if exp.enabled and exp.model in seen_models:
            raise ValueError(
                f"experiments {seen_models[exp.model]!r} and {exp.name!r} both split model {exp.model!r}; enable one"
            )
        if exp.enabled:
            seen_models[exp.model] = exp.name
        for v in exp.variants:
            unknown = [b for b in v.backends if b not in known_backends]
            if unknown:
                raise ValueError(f"experiment {exp.name!r}, variant {v.name!r} names unknown backends {unknown}")


# ---------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------


def unit_hash(*parts: str) -> float:
    """A stable uniform number in [0, 1) from strings (blake2b; same in every process).

    Parts are joined with NUL so ("ab", "c") and ("a", "bc") differ.
    """
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    backends: tuple[str, ...]
    shadow: bool = False


@dataclass(frozen=True)
class Assignment:
    """Which variant serves a request, and why (for logs and the response header)."""

    experiment: str
    variant: Variant
    sticky: bool  # False when the sticky value was missing and a per-request value was used


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str
    variants: tuple[Variant, ...]
    sticky_by: StickyBy = "key"
    header: str | None = None
    shadow_sample: float = 0.0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Experiment:
        """The runtime form of a validated config."""
        return cls(
            name=cfg.name,
            model=cfg.model,
            variants=tuple(Variant(v.name, v.live_weight(), tuple(v.backends), v.shadow) for v in cfg.variants),
            sticky_by=cfg.sticky_by,
            header=cfg.header,
            shadow_sample=cfg.shadow_sample,
        )

    def __post_init__(self) -> None:
        if not any(v.weight > 0 and not v.shadow for v in self.variants):
            raise ValueError(f"experiment {self.name!r} has no live variant")

    @property
    def live(self) -> tuple[Variant, ...]:
        """Variants that take live traffic (weight > 0, not shadow), in config order."""
        return tuple(v for v in self.variants if v.weight > 0 and not v.shadow)

    @property
    def shadows(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if v.shadow)

    def sticky_value(self, *, api_key: str | None, user: str | None, headers: Mapping[str, str]) -> str | None:
        """The value this experiment is sticky by, or None when the request lacks it.

        `api_key` should be a stable id of the key (its hash or key id), never the secret.
        Header lookup is case-insensitive.
        """
        if self.sticky_by == "key":
            return api_key or None
        if self.sticky_by == "user":
            return user or None
        if self.sticky_by == "header":
            assert self.header is not None
            wanted = self.header.lower()
            for name, value in headers.items():
                if name.lower() == wanted:
                    return value or None
            return None
        return None

    def assign(self, sticky_value: str | None, fallback: str) -> Assignment:
        """The variant for a request: by `sticky_value`, else by `fallback` (use the request
        id, so a caller without the sticky value is split per request, still by weight)."""
        value = sticky_value if sticky_value is not None else fallback
        return Assignment(self.name, self.variant_at(unit_hash(self.name, value)), sticky_value is not None)

    def variant_at(self, u: float) -> Variant:
        """The live variant owning point u in [0, 1) of the cumulative weights."""
        live = self.live
        total = sum(v.weight for v in live)
        point = u * total
        acc = 0.0
        for v in live:
            acc += v.weight
            if point < acc:
                return v
        return live[-1]  # u*total rounding up to total

    def should_shadow(self, u: float) -> bool:
        """Mirror this request to the shadow variants? `u` uniform in [0, 1) from the caller
        (an RNG draw, or `unit_hash(name, "shadow", request_id)` for reproducible samples)."""
        return bool(self.shadows) and u < self.shadow_sample


def experiments_by_model(configs: Sequence[ExperimentConfig]) -> dict[str, Experiment]:
    """Enabled experiments keyed by the alias they split (validate_experiments ensured one each)."""
    return {c.model: Experiment.from_config(c) for c in configs if c.enabled}
