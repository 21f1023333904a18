"""Each backend kind's `options:` model: unknown keys and mistyped values are rejected with the
field named, a policy's bad option is reported by file, line and field, and checking a policy
imports no engine."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from pydantic import ValidationError

from backends.options import BackendOptions
from gateway.registry import OPTIONS_MODELS, backend_options, check_options
from policies.schema import BackendConfig, ConfigError, parse_config
from tests.conftest import REPO

# Per kind: an option with its type, a value of the wrong type that lax pydantic would coerce
# silently ("512" -> 512, 1 -> True), and pydantic's message for it.
MISTYPED = {
    "llamacpp": ("n_ctx", "512", "Input should be a valid integer"),
    "paged": ("enable_prefix_caching", 1, "Input should be a valid boolean"),
    "remote": ("max_connections", 10.0, "Input should be a valid integer"),
    "litellm": ("total_timeout_s", "30", "Input should be a valid number"),
}


def test_every_schema_kind_has_an_options_model() -> None:
    kinds = typing.get_args(BackendConfig.model_fields["kind"].annotation)
    assert set(OPTIONS_MODELS) == set(kinds) == {"llamacpp", "paged", "remote", "litellm"}
    for kind, model in OPTIONS_MODELS.items():
        assert issubclass(model, BackendOptions) and model.kind == kind
        assert model.model_validate({}) == model()  # every option has a default


@pytest.mark.parametrize("kind", sorted(MISTYPED))
def test_a_mistyped_option_is_rejected_naming_the_field(kind: str) -> None:
    field, value, message = MISTYPED[kind]
    with pytest.raises(ValidationError) as info:
        OPTIONS_MODELS[kind].model_validate({field: value})
    [err] = info.value.errors()
    assert err["loc"] == (field,) and err["msg"] == message
    with pytest.raises(ValueError, match=f"{kind} backend option {field}: {message}"):
        OPTIONS_MODELS[kind].from_dict({field: value})  # engines built directly say the same


@pytest.mark.parametrize("kind", ["llamacpp", "paged", "remote"])
def test_an_unknown_option_is_rejected_naming_it(kind: str) -> None:
    with pytest.raises(ValidationError) as info:
        OPTIONS_MODELS[kind].model_validate({"n_ctxx": 512})
    [err] = info.value.errors()
    assert err["loc"] == ("n_ctxx",) and err["type"] == "extra_forbidden"
    with pytest.raises(ValueError, match=f"unknown {kind} backend option\\(s\\): n_ctxx; known: "):
        OPTIONS_MODELS[kind].from_dict({"n_ctxx": 512})


def test_litellm_passes_other_keys_to_litellm_but_checks_its_own() -> None:
    """litellm takes provider parameters (aws_region_name, ...) as extra keys, by design."""
    cfg = BackendConfig(name="c", kind="litellm", model="bedrock/x", options={"aws_region_name": "eu-west-1", "max_concurrency": 4})
    assert backend_options(cfg).model_dump() == {
        "first_token_timeout_s": 60.0, "total_timeout_s": 600.0, "max_concurrency": 4, "aws_region_name": "eu-west-1",
    }  # fmt: skip
    with pytest.raises(ValidationError, match="max_concurrency"):
        OPTIONS_MODELS["litellm"].model_validate({"max_concurrency": 0})


def test_ranges_and_choices_are_part_of_the_models() -> None:
    with pytest.raises(ValueError, match="llamacpp backend option instances: Input should be greater than or equal to 1"):
        OPTIONS_MODELS["llamacpp"].from_dict({"instances": 0})
    with pytest.raises(ValueError, match="paged backend option dtype: Input should be 'auto', 'float32'"):
        OPTIONS_MODELS["paged"].from_dict({"dtype": "fp7"})
    with pytest.raises(ValueError, match="paged backend option kernels"):
        OPTIONS_MODELS["paged"].from_dict({"kernels": "cuda"})
    # An int is a fine float; YAML writes `kv_cache_gib: 1`.
    assert OPTIONS_MODELS["paged"].model_validate({"kv_cache_gib": 1}).kv_cache_gib == 1.0  # type: ignore[attr-defined]


POLICY = """\
backends:
  - name: runner
    kind: llamacpp
    model: m
    options:
      instances: 2
      n_ctx: "4096"
  - name: node
    kind: remote
    model: m
    url: http://127.0.0.1:1/v1
    options: {connect_timeout: 2}
"""


def test_check_options_names_file_line_and_field() -> None:
    config = parse_config(POLICY, source="x.yaml")  # the schema leaves options to their kind
    with pytest.raises(ConfigError) as info:
        check_options(config, POLICY, source="x.yaml")
    assert str(info.value).splitlines() == [
        "x.yaml:7: backends.0.options.n_ctx: Input should be a valid integer",
        "x.yaml:12: backends.1.options.connect_timeout: Extra inputs are not permitted",
    ]
    with pytest.raises(ConfigError) as info:  # a loaded Config alone: the field, without a line
        check_options(config)
    assert str(info.value).splitlines()[0] == "backends.0.options.n_ctx: Input should be a valid integer"


def test_checking_options_imports_no_engine_or_http_client() -> None:
    """`turnout check` runs in ops CI: option models must not pull in torch or llama_cpp."""
    code = (
        "import sys\n"
        "from gateway.registry import check_options\n"
        "from gateway.policy_file import load_config\n"
        "check_options(load_config('config/examples/ab-test.yaml'))\n"
        "print(sorted(m for m in ('torch', 'llama_cpp', 'litellm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
