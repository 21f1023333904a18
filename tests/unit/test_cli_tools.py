"""The tools' rooms: `turnout serve` never imports the bench, sim or A/B report modules, and
the CLI still hands each tool its own arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import cli
from tests.conftest import REPO

TOOLS = ("gateway.bench", "gateway.sim", "gateway.ab")  # prefixes: the old flat modules (gateway.ab_report, ...) too
LOG = Path(__file__).parent / "data" / "ab_samples.jsonl"

# What `turnout serve` imports before it serves: the CLI, its parser and the app factory.
SERVE_IMPORTS = """
import sys
import gateway.cli, gateway.app, gateway.runtime
args = gateway.cli.build_parser().parse_args(["serve", "--port", "9"])
assert args.func is gateway.cli.cmd_serve
tools = sorted(m for m in sys.modules if m.startswith({tools!r}))
assert not tools, tools
"""


def test_serve_imports_no_tool() -> None:
    out = subprocess.run([sys.executable, "-c", SERVE_IMPORTS.format(tools=TOOLS)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_the_check_itself_sees_a_tool_import() -> None:
    # The same check after a tool's import fails: it is not vacuous.
    code = SERVE_IMPORTS.format(tools=TOOLS).replace("import gateway.cli,", "import gateway.sim.simulator, gateway.cli,")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "gateway.sim.simulator" in out.stderr


@pytest.mark.parametrize(
    ("argv", "prog"),
    [(["ab", "report", "--help"], "turnout ab report"), (["bench", "serve", "--help"], "turnout bench serve"),
     (["bench", "engine", "--help"], "turnout bench engine"), (["sim", "--help"], "turnout sim")],
)  # fmt: skip
def test_each_tool_prints_its_own_help(argv: list[str], prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog}")


def test_tool_arguments_reach_the_tool_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ab", "report", "--bootstrap", "100", "runner-vs-paged", "--log", str(LOG), "--baseline", "paged"]) == 0
    out = capsys.readouterr().out
    assert "against baseline 'paged'" in out and "100 resamples" in out
    assert cli.main(["ab", "report", "no-such-experiment", "--log", str(LOG)]) == 1
