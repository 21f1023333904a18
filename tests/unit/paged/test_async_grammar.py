"""Async scheduling with grammar-constrained rows, on the CPU: a step's forward pass is launched
before the last step is collected, its masks are filled after (the grammars moved past the last
step's tokens), and the step stays in flight. Every result must equal the synchronous engine's."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest

import backends.paged.model_runner as runner_module
from backends.generation import GenerationRequest, SamplingParams
from backends.grammar import Constraint
from backends.paged.cuda_graphs import DecodeGraphRunner
from backends.paged.engine import LLMEngine
from backends.paged.sequence import PENDING, SeqStatus

from .test_gpu_paths_on_cpu import _capture_without_cuda
from .test_grammar import SCHEMA, constrained

EOS = 2
A = ord("a") + 3  # the byte tokenizer's id of "a"


def run(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[tuple[str, int], tuple[list[int], str, str | None]]:
    """(token ids, text, finish reason) per (request, choice), stepping by hand. Counts the
    steps left in flight with constrained rows in engine.counters.extra["constrained_in_flight"]."""
    for r in requests:
        engine.add_request(r)
    out: dict[tuple[str, int], tuple[list[int], str, str | None]] = {}
    in_flight = 0
    while engine.has_unfinished():
        for o in engine.step():
            key = (o.request_id, o.delta.index)
            ids, text, fin = out.get(key, ([], "", None))
            assert fin is None, f"{key} produced a delta after finishing"
            out[key] = (ids + o.delta.token_ids, text + o.delta.text, o.delta.finish_reason)
        in_flight += engine._inflight is not None and engine._inflight.constrained
    engine.counters.extra["constrained_in_flight"] = in_flight
    return out


def mixed_batch(engine: LLMEngine, *, host_sampler: bool = True) -> list[GenerationRequest]:
    """Constrained rows (greedy, a stop string, a length cut; with `host_sampler` seeded ones and
    n = 2) among unconstrained ones that end on EOS, a stop string or their length (and with
    `host_sampler` a seeded one). Rows for the host sampler make their steps collect at once."""
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reqs = [
        constrained(engine, "c-greedy", [1, 40, 50], temperature=0.0),
        constrained(engine, "c-greedy2", [1, 41, 52, 53, 54, 55, 56, 57, 58, 59, 60], temperature=0.0),
        constrained(engine, "c-stop", [1, 44, 50], temperature=0.0, stop=['": ']),  # stops inside the object
        constrained(engine, "c-short", [1, 45, 50], temperature=0.0, max_tokens=5),  # cut at its length
        GenerationRequest("g-len", [1, 60, 70, 80], plain),
        GenerationRequest("g-eos", [1, 61, 70], SamplingParams(max_tokens=30, temperature=0.0, logit_bias={EOS: 100.0})),
        GenerationRequest("g-stopstr", [1, 62, 70], SamplingParams(max_tokens=20, temperature=0.0, logit_bias={A: 100.0}, stop=["aaa"])),
    ]
    if host_sampler:
        reqs += [
            # Cut short, so that the steps after them stay on the device (and in flight).
            constrained(engine, "c-seeded", [1, 42, 50], temperature=1.0, top_p=0.95, seed=7, max_tokens=12),
            constrained(engine, "c-choices", [1, 43, 50], temperature=0.8, seed=3, n=2, max_tokens=12),
            GenerationRequest("g-seeded", [1, 63, 70], SamplingParams(max_tokens=12, temperature=0.9, seed=11, ignore_eos=True)),
        ]
    return reqs


def with_graphs(engine: LLMEngine) -> LLMEngine:
    """Decode steps through the CUDA-graph runner (its logits buffer reused by every replay)."""
    engine.runner.graphs = DecodeGraphRunner(
        engine.runner.model, engine.runner.cache, max_batch=engine.options.max_num_seqs,
        max_blocks_per_seq=-(-engine.max_model_len // engine.options.block_size),
        max_context=engine.max_model_len, splits_for=lambda b, ctx: 1,
    )  # fmt: skip
    _capture_without_cuda(engine.runner.graphs)
    return engine


@pytest.mark.parametrize("host_sampler", [False, True])
@pytest.mark.parametrize("graphs", [False, True])
def test_constrained_outputs_equal_with_async_scheduling_on_and_off(make_engine, graphs: bool, host_sampler: bool) -> None:
    def go(asy: bool):
        engine = make_engine(num_blocks=160, block_size=4, max_num_batched_tokens=16, max_num_seqs=12, async_scheduling=asy)
        if graphs:
            with_graphs(engine)
        out = run(engine, mixed_batch(engine, host_sampler=host_sampler))
        assert engine.scheduler.num_grammar_rejections == 0
        if graphs:
            assert engine.counters.graph_steps > 0
        # Async: constrained steps stay in flight (with host-sampler rows, once those are done).
        assert (engine.counters.extra["constrained_in_flight"] > 10) == asy
        return out

    sync, asy = go(False), go(True)
    assert asy == sync
    for key in [("c-greedy", 0), ("c-greedy2", 0)]:
        ids, text, finish = asy[key]
        assert finish == "stop" and ids[-1] == EOS, key
        jsonschema.validate(json.loads(text), SCHEMA)
    if host_sampler:
        seeded = [asy[k] for k in [("c-seeded", 0), ("c-choices", 0), ("c-choices", 1)]]
        assert all(text.startswith('{"') and len(ids) == 12 and finish == "length" for ids, text, finish in seeded)
    assert asy[("c-stop", 0)][2] == "stop" and asy[("c-stop", 0)][1].startswith('{"') and '": ' not in asy[("c-stop", 0)][1]
    assert asy[("c-short", 0)][2] == "length" and len(asy[("c-short", 0)][0]) == 5
    assert asy[("g-eos", 0)] == ([EOS], "", "stop")
    assert asy[("g-stopstr", 0)][1:] == ("", "stop")
    assert len(asy[("g-len", 0)][0]) == 30 and asy[("g-len", 0)][2] == "length"


def test_unseeded_sampling_with_grammar_stays_valid_under_async_scheduling(make_engine) -> None:
    """Unseeded temperature rows are drawn on the device in one batch: the masks apply there too."""
    engine = make_engine(num_blocks=160, block_size=4, async_scheduling=True)
    reqs = [constrained(engine, f"r{i}", [1, 30 + i, 50], temperature=1.0) for i in range(6)]
    out = run(engine, reqs)
    for ids, text, finish in out.values():
        assert finish == "stop" and ids[-1] == EOS
        jsonschema.validate(json.loads(text), SCHEMA)
    assert engine.scheduler.num_grammar_rejections == 0


def test_constrained_step_stays_in_flight_and_grammars_advance_once_per_token(make_engine, monkeypatch) -> None:
    engine = make_engine(num_blocks=160, block_size=4, async_scheduling=True)
    reqs = [constrained(engine, f"c{i}", [1, 40 + i, 50 + i], temperature=0.0) for i in range(4)]
    reqs.append(GenerationRequest("g", [1, 60, 70], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
    seq_of: dict[int, object] = {}  # id(constraint) -> its sequence

    accepted: Counter[int] = Counter()
    real_accept = Constraint.accept

    def counting_accept(self: Constraint, token: int) -> bool:
        accepted[id(self)] += 1
        return real_accept(self, token)

    monkeypatch.setattr(Constraint, "accept", counting_accept)

    calls: list[tuple[str, int]] = []  # (runner call, step number); "fill" for a mask fill
    runner = engine.runner
    step_no: dict[int, int] = {}  # id(LaunchedStep) -> its step number
    constrained_steps: set[int] = set()
    skipped = 0  # constrained rows whose sequence had finished when their step's masks were filled

    def wrap(name: str):
        real = getattr(runner, name)

        def wrapped(arg):
            nonlocal skipped
            if name == "launch_forward":
                result = real(arg)
                step_no[id(result)] = n = len(step_no)
                calls.append((name, n))
                if result.constrained:
                    constrained_steps.add(n)
                return result
            if name == "launch_sampling" and arg.constrained:
                skipped += sum(seq.constraint is not None and seq.status is SeqStatus.FINISHED for seq in arg.rows)
            calls.append((name, step_no[id(arg)]))
            return real(arg)

        monkeypatch.setattr(runner, name, wrapped)

    for name in ("launch_forward", "launch_sampling", "collect"):
        wrap(name)

    real_fill = runner_module.fill_bitmasks

    def checking_fill(rows, bitmask):
        calls.append(("fill", calls[-1][1]))
        for constraint, _ in rows:
            seq = seq_of[id(constraint)]
            # Every token before the step's own (PENDING) place has been accepted, no more.
            assert seq.status is not SeqStatus.FINISHED
            assert seq.num_pending == 1 and seq.output_ids[-1] == PENDING
            assert accepted[id(constraint)] == len(seq.output_ids) - 1
        return real_fill(rows, bitmask)

    monkeypatch.setattr(runner_module, "fill_bitmasks", checking_fill)

    for r in reqs:
        engine.add_request(r)
    for group in engine.requests.values():
        for seq in group.seqs:
            if seq.constraint is not None:
                seq_of[id(seq.constraint)] = seq
    out: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    in_flight_constrained = 0
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.delta.token_ids)
            texts[o.request_id] = texts.get(o.request_id, "") + o.delta.text
        launched = engine._inflight
        if engine.runner.last_step is not None and engine.runner.last_step.num_prefill_tokens == 0 and any(
            seq.constraint is not None and seq.status is SeqStatus.RUNNING and not seq.final_pending for seq in engine.scheduler.running
        ):
            # A decode step with live constrained rows, sampled on the device: not collected yet.
            assert launched is not None and launched.constrained and launched.deferrable
            in_flight_constrained += 1
    assert in_flight_constrained > 20
    assert skipped > 0, "a row whose grammar ended with EOS at the step before gets no mask"

    for group_id in (f"c{i}" for i in range(4)):
        ids = out[group_id]
        assert ids[-1] == EOS
        jsonschema.validate(json.loads(texts[group_id]), SCHEMA)
    # Each constraint took each of its tokens once (EOS ends the sequence without a grammar step;
    # the place of the step launched after it stays PENDING, its token dropped).
    for constraint_id, seq in seq_of.items():
        known = [t for t in seq.output_ids if t != PENDING]
        assert known == out[seq.request_id] and known[-1] == EOS
        assert accepted[constraint_id] == len(known) - 1

    # The order within a step: the forward pass of N, then N - 1 collected (every earlier step
    # is), then N's masks filled and its sampling launched.
    overlapped = 0
    for i, (name, n) in enumerate(calls):
        if name == "launch_sampling" and n in constrained_steps:
            assert calls[i + 1] == ("fill", n)
            forward_at = calls.index(("launch_forward", n))
            collected = {m for name, m in calls[:i] if name == "collect"}
            assert collected >= set(range(n))
            overlapped += ("collect", n - 1) in calls[forward_at:i]
        elif name == "launch_sampling":
            assert calls[i + 1 : i + 2] != [("fill", n)]  # no masks for a step without grammar rows
    assert overlapped > 20


def test_constrained_outputs_unchanged_by_async_scheduling_under_preemption(make_engine) -> None:
    """A tight pool preempts constrained sequences that have a step in flight."""

    def go(asy: bool):
        engine = make_engine(num_blocks=30, block_size=4, max_num_batched_tokens=8, watermark=0.0, async_scheduling=asy)
        reqs = [constrained(engine, f"c{i}", [1] + list(range(100 + i, 112 + i)), temperature=0.0, max_tokens=60) for i in range(4)]
        out = run(engine, reqs)
        assert engine.scheduler.num_preemptions > 0
        return out

    assert go(True) == go(False)

