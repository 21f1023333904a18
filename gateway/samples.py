"""The experiment sample log: one JSON line per finished request of an A/B experiment.

The serving path writes it (`append_sample`, called by gateway/runtime.py); `turnout ab
report` (gateway/ab/report.py) reads it (`read_samples`). This module is all the serving
path imports of the A/B tools: the json module and a dataclass, nothing of the statistics.

The format
----------
JSON Lines; one file may hold many experiments. Fields:

    ts                 float   unix time the request finished
    experiment         str     experiment name (policy `experiments[].name`)
    variant            str     variant name that served it
    status             int     HTTP status the client got (for shadow traffic: would have got);
                               0 when the upstream never answered (connection lost, cancelled)
    ttft_s             float?  seconds from receipt to the first content byte; for a
                               non-streamed answer, to the whole answer; null on failure
    tpot_s             float?  mean seconds per output token after the first, as the client
                               saw them arrive: (e2e_s - ttft_s) / (completion_tokens - 1);
                               null if < 2 tokens. Meaningless for a non-streamed answer
                               (its tokens arrive together): the report ignores it there
    e2e_s              float   seconds from receipt to the last byte (or the failure)
    prompt_tokens      int
    completion_tokens  int
    shadow             bool    optional, default false: a mirrored request nobody waited for
    stream             bool?   optional: whether the answer was streamed (SSE); absent in
                               logs written before the field existed
    decode_s           float?  optional: the backend's own decode time, by its own clock
                               (no network, no gateway): the seconds in which it generated
                               `output_tokens` tokens after the prompt was processed
    output_tokens      int?    optional: the tokens generated within `decode_s`. With both,
                               the report's TPOT is decode_s / output_tokens, streamed or not

Example::

    {"ts": 1718000000.5, "experiment": "runner-vs-paged", "variant": "paged", "status": 200,
     "ttft_s": 0.081, "tpot_s": 0.0123, "e2e_s": 0.87, "prompt_tokens": 34, "completion_tokens": 64,
     "stream": true}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def default_log_path() -> Path:
    """`$TURNOUT_HOME/experiments/samples.jsonl`, default under `~/.cache/turnout`."""
    home = os.environ.get("TURNOUT_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "turnout"
    return base / "experiments" / "samples.jsonl"


@dataclass
class Sample:
    """One finished request of an experiment (the module docstring defines every field).

    The optional fields at the end default to None, "not known": `stream` (whether the
    answer was streamed), and the backend's own timings `decode_s` (seconds of decoding, by
    the backend's clock) with `output_tokens` (the tokens generated in that time). The
    report takes TPOT from the backend's timings where a sample has them, from `tpot_s`
    for streamed answers, and reports none for non-streamed answers without them."""

    experiment: str
    variant: str
    status: int
    e2e_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ts: float = 0.0
    shadow: bool = False
    stream: bool | None = None
    decode_s: float | None = None
    output_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return 0 < self.status < 400

    @property
    def is_error(self) -> bool:
        return self.status == 0 or self.status >= 500

    def to_json(self) -> str:
        """One log line (no newline)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Sample:
        """Parse one log object; raises ValueError/TypeError/KeyError on a malformed one."""

        def opt(name: str) -> float | None:
            value = obj.get(name)
            return None if value is None else float(value)

        stream = obj.get("stream")
        output_tokens = obj.get("output_tokens")
        return cls(
            experiment=str(obj["experiment"]),
            variant=str(obj["variant"]),
            status=int(obj["status"]),
            e2e_s=float(obj["e2e_s"]),
            ttft_s=opt("ttft_s"),
            tpot_s=opt("tpot_s"),
            prompt_tokens=int(obj.get("prompt_tokens") or 0),
            completion_tokens=int(obj.get("completion_tokens") or 0),
            ts=float(obj.get("ts") or 0.0),
            shadow=bool(obj.get("shadow", False)),
            stream=None if stream is None else bool(stream),
            decode_s=opt("decode_s"),
            output_tokens=None if output_tokens is None else int(output_tokens),
        )


def append_sample(path: Path, sample: Sample) -> None:
    """Append one sample to the log (one write of one line: concurrent appenders in one
    process do not interleave lines; the gateway should still call this off the event loop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(sample.to_json() + "\n")


def read_samples(lines: Iterable[str], experiment: str) -> tuple[list[Sample], int]:
    """The experiment's samples from log lines, and how many lines were malformed (skipped:
    a crash mid-append leaves a partial last line, which must not sink the report)."""
    samples: list[Sample] = []
    bad = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            if obj.get("experiment") != experiment:
                continue
            samples.append(Sample.from_obj(obj))
        except (ValueError, TypeError, KeyError, AttributeError):
            bad += 1
    return samples, bad
