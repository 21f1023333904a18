"""The `turnout` command line, as a person uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def turnout(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_models_lists_the_store(model_path: Path) -> None:
    out = turnout("models")
    assert out.returncode == 0
    assert "smollm2-135m" in out.stdout and str(model_path) in out.stdout


def test_pull_is_idempotent_and_rejects_unknown(model_path: Path) -> None:
    again = turnout("pull", "smollm2-135m")
    assert again.returncode == 0 and again.stdout.strip() == str(model_path)
    unknown = turnout("pull", "no-such-model")
    assert unknown.returncode == 1 and "unknown model" in unknown.stderr


def test_run_one_shot_answers(model_path: Path) -> None:
    out = turnout("run", str(model_path), "Say", "hello.", "--max-tokens", "8", "--temperature", "0", "--ctx", "512")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_run_interactive_keeps_the_conversation(model_path: Path) -> None:
    out = turnout("run", str(model_path), "--max-tokens", "6", "--temperature", "0", "--ctx", "512",
                  stdin="What is 2+2?\nAnd 3+3?\n/bye\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(">>> ") == 3  # two questions answered, then /bye at the third prompt
    answers = [line for line in out.stdout.split(">>> ")[1:3]]
    assert all(a.strip() for a in answers)


def test_run_unknown_model_says_how_to_fix() -> None:
    out = turnout("run", "not-a-model", "hi")
    assert out.returncode == 1 and "turnout models" in out.stderr


def test_serve_refuses_public_bind_without_auth() -> None:
    out = turnout("serve", "--host", "0.0.0.0", "--port", "9")
    assert out.returncode == 2 and "auth: none" in out.stderr and "loopback" in out.stderr


def test_serve_rejects_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - {name: a, kind: nope, model: m}\n")
    out = turnout("serve", "--config", str(bad))
    assert out.returncode == 2 and f"{bad}:2: backends.0.kind" in out.stderr


BAD_OPTIONS = """\
server:
  port: 8080
backends:
  - name: local
    kind: llamacpp
    model: m
    options:
      instances: 1
      n_ctx: "4096"
      n_threds: 2
"""


def test_check_accepts_the_shipped_policies() -> None:
    paths = ["config/default.yaml", *sorted(str(p.relative_to(REPO)) for p in (REPO / "config" / "examples").glob("*.yaml"))]
    out = turnout("check", *paths)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": ok (") == len(paths)


def test_check_names_file_line_and_field_of_a_bad_option(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_OPTIONS)
    out = turnout("check", "config/default.yaml", str(bad))
    assert out.returncode == 1
    assert "config/default.yaml: ok" in out.stdout  # the good file is still reported as such
    assert out.stderr.splitlines() == [
        f"{bad}:9: backends.0.options.n_ctx: Input should be a valid integer",
        f"{bad}:10: backends.0.options.n_threds: Extra inputs are not permitted",
    ]


def test_serve_rejects_a_bad_option(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_OPTIONS)
    out = turnout("serve", "--config", str(bad), "--port", "9")
    assert out.returncode == 2 and "backends.0.options.n_ctx: Input should be a valid integer" in out.stderr
