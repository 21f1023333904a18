"""What every backend kind's `options:` model shares: pydantic, unknown keys rejected, types strict.

Each kind declares its options as a subclass (llamacpp, paged, remote, litellm); the classes
import pydantic alone, so the serving process and `turnout check` validate a policy without
llama_cpp, torch or an HTTP client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class BackendOptions(BaseModel):
    """Base of each kind's `options:` model. A typo must fail, not be ignored (extra keys are
    errors), and a value must have its type: strict, so YAML's `"512"` or `yes` is not turned
    into an int or a bool behind the writer's back (an int still passes for a float)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: ClassVar[str] = ""  # the backend kind, for messages

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> Self:
        """Validated options for an engine built directly (not through a policy file): a
        ValueError that names each bad option. Policies are checked before this, field by
        field, with file and line (gateway.registry.check_options)."""
        try:
            return cls.model_validate(dict(options))
        except ValidationError as exc:
            raise ValueError(describe(exc, cls)) from None


class EmbeddingOptions(BaseModel):
    """The options of a local backend that embeds (`POST /v1/embeddings`), mixed into the
    llamacpp and paged option models."""

    # mean | last | cls; None: the GGUF's own pooling type where it states one, else "last"
    # (backends.embeddings.DEFAULT_POOLING, the same in both engines).
    pooling: Literal["mean", "last", "cls"] | None = None
    # Whether the model was Matryoshka-trained, so `dimensions` may cut its vectors: true for
    # any size up to the native one, or the list of sizes it was trained for.
    matryoshka: bool | list[Annotated[int, Field(ge=1)]] = False

    @field_validator("matryoshka")
    @classmethod
    def _some_sizes(cls, value: bool | list[int]) -> bool | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("list at least one size, or write true for any size")
        return value


def describe(exc: ValidationError, model: type[BackendOptions]) -> str:
    """One line per problem: unknown options together (with the known ones), then each bad value."""
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    lines = []
    if unknown:
        known = ", ".join(sorted(model.model_fields))
        lines.append(f"unknown {model.kind} backend option(s): {', '.join(sorted(unknown))}; known: {known}")
    for err in exc.errors():
        if err["type"] != "extra_forbidden":
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"{model.kind} backend option {where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)
