"""Policy files: the embedded default validates; a bad edit names file, line and field."""

from __future__ import annotations

import pytest
import yaml

from gateway.app import DEFAULT_CONFIG, load_config
from policies.schema import ConfigError, parse_config


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
POLICIES = sorted((REPO / "config" / "examples").glob("*.yaml")) + sorted((REPO / "deploy" / "compose").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in POLICIES if p.name != "docker-compose.yml"], ids=lambda p: p.name)
def test_worked_examples_and_deploy_policies_validate(path) -> None:  # type: ignore[no-untyped-def]
    config = load_config(path)
    assert config.backends


@pytest.mark.parametrize("manifest", ["policy-configmap.yaml", "gpu-node.yaml"])
def test_kubernetes_configmap_policies_validate(manifest: str) -> None:
    documents = [d for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / manifest).read_text()) if d]
    maps = [d for d in documents if d["kind"] == "ConfigMap"]
    assert maps
    for cm in maps:
        assert parse_config(cm["data"]["config.yaml"], source=manifest).backends


def test_check_command_exit_codes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - {name: a, kind: remote, model: m}\n")
    assert main(["check", str(DEFAULT_CONFIG)]) == 0
    assert main(["check", str(DEFAULT_CONFIG), str(bad)]) == 1


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("{name: a, kind: llamacpp, model: m, options: {n_ctxx: 512}}", "unknown llamacpp backend option(s): n_ctxx"),
        ("{name: a, kind: paged, model: 'dummy:tiny', options: {block_sise: 8}}", "unknown paged backend option(s): block_sise"),
        ("{name: a, kind: paged, model: 'dummy:tiny', options: {dtype: fp7}}", "unknown dtype 'fp7'"),
    ],
)  # fmt: skip
def test_check_rejects_what_a_local_backend_cannot_take(tmp_path, capsys, backend: str, message: str) -> None:  # type: ignore[no-untyped-def]
    """Engine options are checked in the gateway (no model code), so `turnout check` and a
    reload catch them, not the engine worker at its first request."""
    from gateway.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"backends:\n  - {backend}\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and message in err


def test_fallback_cycles_and_unknown_strategies_are_rejected() -> None:
    base = "backends:\n  - {name: a, kind: llamacpp, model: m}\n"
    cycle = base + "routes:\n  - {model: x, backends: [a], fallbacks: [y]}\n  - {model: y, backends: [a], fallbacks: [x]}\n"
    with pytest.raises(ConfigError, match="lead back"):
        parse_config(cycle)
    with pytest.raises(ConfigError, match="unknown routing strategy 'fastest'"):
        parse_config(base + "routes:\n  - {model: x, backends: [a], strategy: fastest}\n")
