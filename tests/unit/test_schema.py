"""Policy files: the embedded default validates; a bad edit names file, line and field."""

from __future__ import annotations

import pytest
import yaml

from gateway.policy_file import DEFAULT_CONFIG, load_config
from gateway.registry import OPTIONS_MODELS, backend_options, check_options
from policies.schema import Config, ConfigError, parse_config


def test_default_config_is_valid() -> None:
    config = load_config(None)
    assert config.server.host == "127.0.0.1" and config.server.port == 8080
    assert config.aliases() == {"smollm2-135m": ["local"]}
    assert DEFAULT_CONFIG.name == "default.yaml"


BAD = """\
server:
  port: 8080
backends:
  - name: a
    kind: llamacpp
    model: m
  - name: b
    kind: llamacpp
    model: m
    optoins: {}
"""


def test_bad_field_names_file_line_and_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BAD, source="policy.yaml")
    message = str(info.value)
    assert "policy.yaml:10: backends.1.optoins" in message and "Extra inputs" in message


def test_unknown_backend_in_route_and_duplicates() -> None:
    text = "backends:\n  - {name: a, kind: llamacpp, model: m}\nroutes:\n  - {model: chat, backends: [zz]}\n"
    with pytest.raises(ConfigError, match="unknown backends"):
        parse_config(text)
    dup = "backends:\n  - {name: a, kind: llamacpp, model: m}\n  - {name: a, kind: llamacpp, model: n}\n"
    with pytest.raises(ConfigError, match="unique"):
        parse_config(dup)


def test_yaml_syntax_error() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("backends: [", source="x.yaml")


def test_routes_and_served_names() -> None:
    config = parse_config(
        "backends:\n"
        "  - {name: a, kind: llamacpp, model: /models/Foo-Q4.gguf}\n"
        "  - {name: b, kind: llamacpp, model: m, served_name: small}\n"
        "routes:\n  - {model: chat, backends: [a, b]}\n"
    )
    assert config.aliases() == {"Foo-Q4": ["a"], "small": ["b"], "chat": ["a", "b"]}


REPO = DEFAULT_CONFIG.parent.parent
POLICIES = (
    sorted((REPO / "config").glob("*.yaml"))
    + sorted((REPO / "config" / "examples").glob("*.yaml"))
    + sorted((REPO / "deploy" / "compose").glob("*.yaml"))
)


def assert_options_validate(config: Config, text: str, source: str) -> None:
    """Every backend's options are valid for its kind (the schema itself leaves them open)."""
    check_options(config, text, source)
    for backend in config.backends:
        assert isinstance(backend_options(backend), OPTIONS_MODELS[backend.kind]), backend.name


@pytest.mark.parametrize("path", [p for p in POLICIES if p.name != "docker-compose.yml"], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_and_deploy_policies_validate_with_their_options(path) -> None:  # type: ignore[no-untyped-def]
    assert_options_validate(load_config(path), path.read_text(), str(path))


def test_shipped_policies_set_options_that_are_checked() -> None:
    """The parametrized check above is not vacuous: the shipped files do set options."""
    configs = [load_config(p) for p in POLICIES]
    assert {b.kind for c in configs for b in c.backends if b.options} >= {"llamacpp", "paged"}


@pytest.mark.parametrize("manifest", ["policy-configmap.yaml", "gpu-node.yaml"])
def test_kubernetes_configmap_policies_validate(manifest: str) -> None:
    documents = [d for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / manifest).read_text()) if d]
    maps = [d for d in documents if d["kind"] == "ConfigMap"]
    assert maps
    for cm in maps:
        text = cm["data"]["config.yaml"]
        assert_options_validate(parse_config(text, source=manifest), text, manifest)


def test_check_command_exit_codes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - {name: a, kind: remote, model: m}\n")
    assert main(["check", str(DEFAULT_CONFIG)]) == 0
    assert main(["check", str(DEFAULT_CONFIG), str(bad)]) == 1


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("{name: a, kind: llamacpp, model: m, options: {n_ctxx: 512}}", "backends.0.options.n_ctxx: Extra inputs are not permitted"),
        ("{name: a, kind: llamacpp, model: m, options: {n_ctx: '512'}}", "backends.0.options.n_ctx: Input should be a valid integer"),
        ("{name: a, kind: paged, model: 'dummy:tiny', options: {block_sise: 8}}", "backends.0.options.block_sise: Extra inputs are not permitted"),
        ("{name: a, kind: paged, model: 'dummy:tiny', options: {dtype: fp7}}", "backends.0.options.dtype: Input should be 'auto', 'float32'"),
        ("{name: a, kind: remote, model: m, url: 'http://127.0.0.1:1', options: {max_connections: many}}",
         "backends.0.options.max_connections: Input should be a valid integer"),
    ],
)  # fmt: skip
def test_check_rejects_what_a_backend_cannot_take(tmp_path, capsys, backend: str, message: str) -> None:  # type: ignore[no-untyped-def]
    """Backend options are checked in the gateway (no model code), so `turnout check` and a
    reload catch them, not the engine worker at its first request; check names the line."""
    from gateway.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"backends:\n  - {backend}\n")
    assert main(["check", str(bad)]) == 1
    assert f"{bad}:2: {message}" in capsys.readouterr().err


def test_fallback_cycles_and_unknown_strategies_are_rejected() -> None:
    base = "backends:\n  - {name: a, kind: llamacpp, model: m}\n"
    cycle = base + "routes:\n  - {model: x, backends: [a], fallbacks: [y]}\n  - {model: y, backends: [a], fallbacks: [x]}\n"
    with pytest.raises(ConfigError, match="lead back"):
        parse_config(cycle)
    with pytest.raises(ConfigError, match="unknown routing strategy 'fastest'"):
        parse_config(base + "routes:\n  - {model: x, backends: [a], strategy: fastest}\n")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # The entry at fault is named with its own line, not the top of the file.
        ("backends:\n  - {name: a, kind: llamacpp, model: m}\nroutes:\n  - model: chat\n    backends:\n      - a\n      - zz\n",
         "7: routes.0.backends.1: route 'chat' names unknown backends ['zz']"),
        ("backends:\n  - {name: a, kind: llamacpp, model: m}\n  - {name: a, kind: llamacpp, model: n}\n",
         "3: backends.1.name: backend names must be unique"),
        ("backends:\n  - {name: a, kind: llamacpp, model: m}\nroutes:\n  - {model: x, backends: [a]}\n  - {model: y, backends: [a], fallbacks: [x, q]}\n",
         "5: routes.1.fallbacks.1: route 'y' falls back to unknown models ['q']"),
        ("auth: {store: redis}\nbackends:\n  - {name: a, kind: llamacpp, model: m}\n", "1: auth.store: keys kept in redis need a `redis` section"),
    ],
    ids=["unknown-backend", "duplicate-name", "unknown-fallback", "redis-store"],
)  # fmt: skip
def test_cross_reference_errors_name_their_line(tmp_path, text: str, where: str) -> None:  # type: ignore[no-untyped-def]
    """What a reload reads a policy with (load_config) locates each at its entry."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:{where}" in str(info.value)
    assert "(top level)" not in str(info.value)
