"""The `options:` of `kind: remote` and `kind: litellm` backends, free of aiohttp and litellm
so that `turnout check` validates them without importing an HTTP client."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from backends.options import BackendOptions


class RemoteOptions(BackendOptions):
    """RemoteBackend's constructor options. Unknown keys and mistyped values are errors."""

    kind = "remote"

    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_token_timeout_s: float = Field(default=60.0, gt=0)
    total_timeout_s: float = Field(default=600.0, gt=0)
    max_connections: int = Field(default=100, ge=0)  # the keep-alive pool (aiohttp: 0 is no limit)


class LiteLLMOptions(BackendOptions):
    """LiteLLMBackend's own options are checked like every kind's; any other key is a litellm
    call parameter (aws_region_name, vertex_project, ...) passed to every call as written, so
    unknown keys are allowed here: litellm, not this gateway, knows each provider's."""

    model_config = ConfigDict(extra="allow")
    kind = "litellm"

    first_token_timeout_s: float = Field(default=60.0, gt=0)
    total_timeout_s: float = Field(default=600.0, gt=0)
    max_concurrency: int = Field(default=100, ge=1)
