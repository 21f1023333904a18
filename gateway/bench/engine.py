"""`turnout bench engine`: offline throughput of the paged engine on dummy (or real) weights,
with transformers' continuous batching on the same GPU and the same weights as the peer, and
the decode step against its rooflines (bytes only; bytes and FLOPs).

    turnout bench engine --shape llama3-8b --num-requests 256 --input-len 256 --output-len 256 \
        --json bench.json

Workloads: `fixed` (every request input-len prompt tokens, output-len generated tokens) or
`sharegpt` (lengths drawn from log-normal distributions shaped like ShareGPT's, seeded).
Every request ignores EOS and generates exactly its output length, greedy.

`--quantization fp8` runs the engine with FP8 weights and activations (`quantization: fp8`,
backends/paged/fp8.py); `--compare-quantization` runs the workload on the bf16 engine first,
then (that engine's memory given back) on an FP8 one built from the same random weights, so
that one run reports both output tok/s; the transformers peer runs on the bf16 weights.

`--json-schema` runs the workload a second time on the same engine with every request
constrained to a small JSON Schema (JSON_SCHEMA), so that one run reports constrained against
unconstrained output tok/s. A grammar ends at EOS once its object is complete, so ignore_eos
cannot hold there: those requests get the same max_tokens and their tok/s counts the tokens
actually generated. Their prompts differ from the first run's in the first token, so the
prefix cache gives them nothing.

The rooflines (gateway/bench/roofline.py): a decode step must read every weight once and the
KV of every context token once, and do 2 x params x batch FLOPs of GEMMs plus attention's.
Bandwidth (a large device-to-device copy, bytes read + written) and matmul peak (a large
matmul in the compute dtype; `torch._scaled_mm` too with fp8) are measured at start, the data
sheet's numbers printed beside them. Two floors per step, summed over the pure-decode steps:
bytes only (sum of bytes / bandwidth), and bytes and FLOPs (per op, max(bytes / bandwidth,
FLOPs / peak)); the report gives the step's wall (and GPU time) over each. The older
`floor_ms_per_step` (all weights, embedding table included, plus KV, over the bandwidth) stays
in the JSON for comparison with earlier figures.

`--model PATH.gguf` (or a store name such as smollm2-135m, or an HF directory) runs the
workload on real weights, loaded as the engine loads them (a GGUF dequantized), with the
model's tokenizer; the prompts stay random ids, drawn from the tokenizer's non-special ones.

`--profile` (CUDA) profiles a few decode steps after the timed run and says what bounds the
step: GPU kernel time by category (GEMM, attention, other), GPU busy time, and host time not
overlapped (gateway/bench/engine_profile.py). `--host-profile` (CPU or CUDA) shows where the
host's time per step goes: the model's calls against the rest, and cProfile's top functions.
On the CPU, with the tiny shape, the model costs little and the host's per-sequence work at
batch 256 shows (one torch thread: the other core's contention stays out of the numbers):

    OMP_NUM_THREADS=1 python -m gateway.bench.engine --device cpu --shape tiny --dtype float32 \
        --num-requests 256 --input-len 16 --output-len 256 --async-scheduling --host-profile \
        --profile-after 8 --profile-steps 100 --no-transformers

`--tensor-parallel-size N` runs the engine on N GPUs (`tensor_parallel_size`: this process is
rank 0 and starts the others); the roofline is then one GPU's: its share of the weights and
of the KV over its bandwidth, the ranks reading in parallel. The transformers peer runs only
at N = 1 (it needs the whole model on one GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gateway.bench.engine_profile import gpu_profile, host_profile, print_profile
from gateway.bench.roofline import DeviceLimits, decode_ops, measure_limits, ops_table, step_floor

SHAPES = ("smollm2-135m", "llama3-1b", "llama3-8b", "llama3-70b", "tiny")  # tiny: CPU smoke runs

# --json-schema's schema: a few unbounded fields, so that a random model's strings mostly run
# to max_tokens, as the unconstrained requests do, and the batch stays comparable.
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    kind: str, n: int, input_len: int, output_len: int, vocab: int, seed: int, exclude: Collection[int] = ()
) -> Workload:
    """Random prompt token ids (never specials: not 0..2, nor any id in `exclude`) and output
    lengths for n requests.

    sharegpt: log-normal lengths with medians input_len / output_len and ShareGPT-like spread
    (sigma 0.9 for prompts, 0.7 for outputs), clipped to [4, 8 x median]."""
    rng = np.random.default_rng(seed)
    if kind == "fixed":
        ins = np.full(n, input_len)
        outs = np.full(n, output_len)
    elif kind == "sharegpt":
        ins = np.clip(np.round(rng.lognormal(math.log(input_len), 0.9, n)), 4, 8 * input_len).astype(int)
        outs = np.clip(np.round(rng.lognormal(math.log(output_len), 0.7, n)), 4, 8 * output_len).astype(int)
    else:
        raise ValueError(f"unknown workload {kind!r}")
    allowed = np.setdiff1d(np.arange(3, vocab), np.asarray(sorted(exclude), dtype=np.int64))
    if len(allowed) == vocab - 3:  # the dummy shapes' case: the same draws as ever
        prompts = [rng.integers(3, vocab, size=int(k)).tolist() for k in ins]
    else:
        prompts = [allowed[rng.integers(0, len(allowed), size=int(k))].tolist() for k in ins]
    return Workload(prompts, [int(x) for x in outs])


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(np.percentile(arr, p)) for p in ps} | {"mean": float(arr.mean())}


@dataclass
class EngineResult:
    shape: str
    workload: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    duration_s: float
    output_tok_s: float
    total_tok_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    kv_pool_blocks: int
    kv_pool_gib: float
    kv_usage_peak: float
    preemptions: int
    steps: int
    decode_steps: int
    graph_steps: int
    decode_step_ms: dict[str, float]
    decode_gpu_ms_mean: float  # CUDA-event time of the model calls (forward pass, sampling) in decode steps
    decode_batch_mean: float
    roofline: dict[str, float]
    load_s: float
    profile: dict[str, Any] = field(default_factory=dict)
    async_scheduling: bool = False
    quantization: str | None = None  # "fp8", or None: the weights in the compute dtype
    kv_cache_dtype: str = "auto"  # the engine option: auto (the compute dtype) or fp8
    tensor_parallel_size: int = 1  # GPUs (ranks) the model is split across; the roofline is one rank's
    finished_stop: int = 0  # requests that ended with "stop" (EOS: with a grammar, its object complete)
    host_profile: dict[str, Any] = field(default_factory=dict)  # --host-profile


def run_engine(args: argparse.Namespace, work: Workload, limits: DeviceLimits | None) -> tuple[EngineResult, Any]:
    """Our engine over the workload; returns the result and the engine (for the peer's weights)."""
    from backends.generation import GenerationRequest, SamplingParams

    engine, load_s = build_engine(args)
    reqs = [
        GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        for i, (p, n) in enumerate(zip(work.prompts, work.output_lens))
    ]
    result, _ = time_requests(engine, args, reqs, work.prompt_tokens, limits, load_s, profile=True)
    return result, engine


def build_engine(args: argparse.Namespace) -> tuple[Any, float]:
    """The engine on dummy weights (or --model's), warmed up; and its load time in seconds."""
    import torch

    from backends.generation import GenerationRequest, SamplingParams
    from backends.paged.engine import LLMEngine

    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    engine = LLMEngine.from_model(
        model_name(args),
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        async_scheduling=scheduling(args),
        seed=args.seed,
        quantization=quantization(args),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
    )
    _sync(torch, cuda)
    load_s = time.perf_counter() - t0
    cfg = engine.config

    # Warm-up: compile the prefill kernels and touch every code path once.
    # Its prompts share no block with the workload's, so the prefix cache gives the run nothing.
    warm_prompts = [[3 + (7 * i + 13 * j) % (cfg.vocab_size - 3) for j in range(40 + 9 * i)] for i in range(8)]
    warm = [GenerationRequest(f"warm{i}", p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)) for i, p in enumerate(warm_prompts)]
    engine.generate_sync(warm)
    return engine, load_s


def time_requests(
    engine: Any,
    args: argparse.Namespace,
    reqs: list[Any],
    prompt_tokens: int,
    limits: DeviceLimits | None,
    load_s: float,
    *,
    profile: bool = False,
    keep_text: bool = False,
) -> tuple[EngineResult, dict[str, str]]:
    """Run `reqs` to completion on a warmed-up engine, timed; the result and, with
    `keep_text`, each request's text (for checking constrained outputs)."""
    import torch

    cuda = args.device == "cuda"
    # CUDA events around the model calls (the forward pass, then the sampling, launched apart
    # for grammar rows) split GPU time from the step's host work. The sampling's span includes
    # any wait of the device for the grammar masks, filled on the host inside that call.
    run_model, run_sampling = engine._run_model, engine._run_sampling
    events: list[tuple[Any, Any]] = []

    def timed_run_model(plan: Any) -> Any:
        a, b = _Stamp(torch, cuda), _Stamp(torch, cuda)
        a.record()
        out = run_model(plan)
        b.record()
        events.append((a, b))
        return out

    def timed_run_sampling(launched: Any) -> None:
        a, b = _Stamp(torch, cuda), _Stamp(torch, cuda)
        a.record()
        run_sampling(launched)
        b.record()
        events.append((a, b))

    engine._run_model, engine._run_sampling = timed_run_model, timed_run_sampling

    first: dict[str, float] = {}
    texts: dict[str, str] = {}
    stopped = 0
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    steps: list[tuple[float, Any, list[Any]]] = []  # (wall seconds, StepInfo, the step's CUDA event pairs)
    usage_peak = 0.0
    prof_result: dict[str, Any] = {}
    preempt0 = engine.scheduler.num_preemptions
    graph0 = engine.counters.graph_steps
    # As vLLM does after start-up: keep the long-lived objects out of the cyclic collector's scans.
    gc.collect()
    gc.freeze()
    t_start = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        n_events = len(events)
        ts = time.perf_counter()
        outs = engine.step()
        te = time.perf_counter()
        if len(events) > n_events:  # the step ran the model (an empty plan does not)
            info = engine.last_step
            steps.append((te - ts, info, events[n_events:]))
        usage_peak = max(usage_peak, engine.block_manager.usage())
        for o in outs:
            rid = o.request_id
            if rid not in first:
                first[rid] = te
            last[rid] = te
            count[rid] = count.get(rid, 0) + len(o.delta.token_ids)
            if keep_text:
                texts[rid] = texts.get(rid, "") + o.delta.text
            stopped += o.delta.finish_reason == "stop"
    duration = time.perf_counter() - t_start
    engine._run_model, engine._run_sampling = run_model, run_sampling
    graph_steps = engine.counters.graph_steps - graph0
    host_prof: dict[str, Any] = {}
    if profile and args.profile and cuda:
        # Outside the timed run: the profiler's start-up and trace processing take seconds.
        prof_result = gpu_profile(engine, torch, reqs, args.profile_after, args.profile_steps)
    if profile and getattr(args, "host_profile", False):
        host_prof = host_profile(engine, reqs, args.profile_after, args.profile_steps)

    produced = sum(count.values())
    ttft = [(first[r.request_id] - t_start) * 1e3 for r in reqs if r.request_id in first]
    tpot = [(last[r.request_id] - first[r.request_id]) * 1e3 / (count[r.request_id] - 1) for r in reqs if count.get(r.request_id, 0) > 1]
    dec = [(wall, info, sum(a.elapsed_time(b) for a, b in pairs)) for wall, info, pairs in steps if info.num_prefill_tokens == 0]
    roofline = decode_roofline(engine, [(w, g / 1e3, info.num_decodes, info.context_tokens) for w, info, g in dec], limits)
    gpu_s = sum(g for _, _, g in dec) / 1e3
    bm = engine.block_manager
    result = EngineResult(
        shape=getattr(args, "model", None) or args.shape,
        workload=args.workload,
        num_requests=len(reqs),
        prompt_tokens=prompt_tokens,
        output_tokens=produced,
        duration_s=duration,
        output_tok_s=produced / duration,
        total_tok_s=(produced + prompt_tokens) / duration,
        ttft_ms=percentiles(ttft),
        tpot_ms=percentiles(tpot),
        kv_pool_blocks=bm.num_blocks,
        kv_pool_gib=engine.cache.nbytes() / 2**30,
        kv_usage_peak=usage_peak,
        preemptions=engine.scheduler.num_preemptions - preempt0,
        steps=len(steps),
        decode_steps=len(dec),
        graph_steps=graph_steps,
        decode_step_ms=percentiles([w * 1e3 for w, _, _ in dec]),
        decode_gpu_ms_mean=gpu_s * 1e3 / max(1, len(dec)),
        decode_batch_mean=float(np.mean([info.num_decodes for _, info, _ in dec])) if dec else 0.0,
        roofline=roofline,
        load_s=load_s,
        profile=prof_result,
        host_profile=host_prof,
        async_scheduling=engine.async_scheduling,
        quantization=engine.options.quantization,
        kv_cache_dtype=engine.options.kv_cache_dtype,
        tensor_parallel_size=engine.options.tensor_parallel_size,
        finished_stop=stopped,
    )
    return result, texts


def decode_roofline(engine: Any, dec: list[tuple[float, float, int, int]], limits: DeviceLimits | None) -> dict[str, Any]:
    """Both floors of the pure-decode steps `dec` ((wall s, GPU s, batch, context tokens) each)
    and the measured step over each; this rank's weights and KV under tensor parallelism. Zeros
    without `limits` (the CPU): no roofline there."""
    import torch

    from backends.paged.kv_cache import bytes_per_block

    weights, local = engine.model.w, engine.runner.local_config
    # The pool's own dtype (kv_cache_dtype fp8: one byte an element); fakes without one: the model's.
    kv_token_bytes = bytes_per_block(local, 1, getattr(engine.runner, "kv_cache_dtype", engine.dtype))
    act_bytes = torch.empty((), dtype=engine.dtype).element_size()
    weight_bytes = weights.nbytes()
    n = max(1, len(dec))
    wall_s, gpu_s = sum(d[0] for d in dec), sum(d[1] for d in dec)
    bw = limits.bandwidth if limits else 0.0
    # The older floor: every weight (the embedding table too) and the KV, over the bandwidth.
    all_weights_s = sum((weight_bytes + ctx * kv_token_bytes) / bw for _, _, _, ctx in dec) if bw else 0.0
    bytes_s = op_s = 0.0
    if limits and bw:
        for _, _, batch, ctx in dec:
            floor = step_floor(decode_ops(weights, local, kv_token_bytes, batch, ctx, limits, act_bytes), bw)
            bytes_s += floor.bytes_s
            op_s += floor.op_s
    mean_batch = float(np.mean([d[2] for d in dec])) if dec else 0.0
    mean_ctx = float(np.mean([d[3] for d in dec])) if dec else 0.0
    ops = ops_table(decode_ops(weights, local, kv_token_bytes, mean_batch, mean_ctx, limits, act_bytes), bw) if limits and bw else []

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    return {
        "limits": limits.as_dict() if limits else {},
        "copy_bandwidth_gb_s": bw / 1e9,  # 0 on CPU: no roofline there
        "matmul_tflops": (limits.matmul_flops / 1e12) if limits else 0.0,
        "fp8_tflops": (limits.fp8_flops or 0.0) / 1e12 if limits else 0.0,
        "weight_bytes": float(weight_bytes),
        "kv_bytes_per_token": float(kv_token_bytes),
        "mean_batch": mean_batch,
        "mean_context_tokens": mean_ctx,
        "bytes_floor_ms_per_step": bytes_s * 1e3 / n,  # sum(bytes) / bandwidth
        "op_floor_ms_per_step": op_s * 1e3 / n,  # sum over ops of max(bytes / bandwidth, FLOPs / peak)
        "wall_over_bytes_floor": ratio(wall_s, bytes_s),
        "wall_over_op_floor": ratio(wall_s, op_s),
        "gpu_over_bytes_floor": ratio(gpu_s, bytes_s),
        "gpu_over_op_floor": ratio(gpu_s, op_s),
        "ops_at_mean_batch": ops,
        # The older bytes-only floor, for comparison with earlier figures.
        "floor_ms_per_step": all_weights_s * 1e3 / n,
        "efficiency": ratio(all_weights_s, wall_s),  # of the step's wall time
        "efficiency_gpu_time": ratio(all_weights_s, gpu_s),  # of the model call's GPU time
    }


def model_name(args: argparse.Namespace) -> str:
    """What the engine loads: --model, or the dummy shape."""
    return getattr(args, "model", None) or f"dummy:{args.shape}"


def scheduling(args: argparse.Namespace) -> bool | None:
    """The engine's async_scheduling option: forced off or on, or None (the device's default)."""
    if getattr(args, "sync_scheduling", False):
        return False
    return True if getattr(args, "async_scheduling", False) else None


def quantization(args: argparse.Namespace) -> str | None:
    """The engine's `quantization` option from --quantization ("none": None)."""
    q = getattr(args, "quantization", "none")
    return None if q in (None, "none") else q


def fp8_refusal(args: argparse.Namespace) -> str | None:
    """Why an FP8 engine cannot run with these arguments (the engine's own checks: the
    options', then the device's), or None."""
    from backends.paged.fp8 import check_fp8_support
    from backends.paged.options import EngineOptions

    try:
        opts = EngineOptions.from_dict({"device": args.device, "dtype": args.dtype, "quantization": "fp8"})
        check_fp8_support(opts.torch_device())
    except ValueError as exc:
        return str(exc)
    return None


def release_engine(engine: Any) -> None:
    """Give an engine's device memory back (KV pool, CUDA graphs, weights) before the next
    engine is built in the same process. Explicitly, not by dropping the last reference: the
    timed run froze the collector's view (gc.freeze), and the engine holds reference cycles."""
    import torch

    engine.cache.k.clear()
    engine.cache.v.clear()
    engine.graphs = None
    engine.model = None
    engine.close()  # tensor-parallel ranks, if any
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_json_schema(engine: Any, args: argparse.Namespace, work: Workload, limits: DeviceLimits | None) -> dict[str, Any]:
    """The workload again, every request constrained to JSON_SCHEMA (see the module docstring):
    the timed result, how many outputs ended complete, and of those how many parse and validate."""
    from backends.generation import GenerationRequest, SamplingParams
    from backends.grammar import json_schema_grammar

    grammar = json_schema_grammar(JSON_SCHEMA)
    t0 = time.perf_counter()
    compiled = engine.tokenizer.grammar_compiler(engine.config.vocab_size).compile(grammar, what="--json-schema", param="schema")
    compile_s = time.perf_counter() - t0
    vocab = engine.config.vocab_size

    def request(rid: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=grammar)
        return GenerationRequest(rid, prompt, params, constraint=compiled.copy())

    # Warm-up: the mask's buffers and kernels.
    engine.generate_sync([request(f"jwarm{i}", [3 + (11 * i + 5 * j) % (vocab - 3) for j in range(24)], 8) for i in range(4)])
    # First token moved: every block's chain digest differs from the first run's.
    reqs = [request(f"j{i}", [3 + (p[0] - 2) % (vocab - 3), *p[1:]], n) for i, (p, n) in enumerate(zip(work.prompts, work.output_lens))]
    result, texts = time_requests(engine, args, reqs, work.prompt_tokens, limits, 0.0, keep_text=True)
    return {**asdict(result), "compile_s": compile_s, "valid_json": sum(_valid(t) for t in texts.values())}


def _valid(text: str) -> bool:
    """Whether text is JSON that validates against JSON_SCHEMA."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), JSON_SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _sync(torch: Any, cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


class _Stamp:
    """A CUDA event on the GPU (device time), a host clock reading on the CPU."""

    def __init__(self, torch: Any, cuda: bool) -> None:
        self._event = torch.cuda.Event(enable_timing=True) if cuda else None
        self._t = 0.0

    def record(self) -> None:
        if self._event is not None:
            self._event.record()
        else:
            self._t = time.perf_counter()

    def elapsed_time(self, end: _Stamp) -> float:
        """Milliseconds from this stamp to `end`."""
        if self._event is not None:
            return self._event.elapsed_time(end._event)
        return (end._t - self._t) * 1e3


def run_transformers(engine: Any, work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """transformers' continuous batching (generate_batch, paged cache) on the engine's weights."""
    import inspect

    import torch
    import transformers
    from transformers import GenerationConfig

    from backends.paged.hf_compat import build_hf_model

    if len(set(work.output_lens)) != 1:
        return {"skipped": "generate_batch takes one max_new_tokens for all requests; run the fixed workload"}
    config, weights = engine.config, engine.model.w
    # Free the engine's KV pool and graphs first: transformers sizes its cache from free memory.
    engine.cache.k.clear()
    engine.cache.v.clear()
    engine.graphs = None
    gc.collect()
    torch.cuda.empty_cache()
    model = build_hf_model(config, weights, attn_implementation=args.hf_attn)
    del weights
    engine.model = None
    gc.collect()
    torch.cuda.empty_cache()
    gen = GenerationConfig(max_new_tokens=work.output_lens[0], do_sample=False, eos_token_id=-1, pad_token_id=0)
    params = inspect.signature(model.generate_batch).parameters
    kwargs: dict[str, Any] = {}
    if "progress_bar" in params:
        kwargs["progress_bar"] = False

    def generate(prompts: list[list[int]], max_new: int) -> dict[str, Any]:
        g = GenerationConfig(**{**gen.to_dict(), "max_new_tokens": max_new})
        with torch.no_grad():  # not inference_mode: its worker thread updates buffers in place
            return model.generate_batch(inputs=prompts, generation_config=g, **kwargs)

    generate([p[:32] for p in work.prompts[:8]], 8)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(work.prompts, work.output_lens[0])
    torch.cuda.synchronize()
    duration = time.perf_counter() - t0
    produced = sum(len(o.generated_tokens) for o in out.values())
    return {
        "transformers_version": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "requests_returned": len(out),
        "output_tokens": produced,
        "duration_s": duration,
        "output_tok_s": produced / duration,
        "total_tok_s": (produced + work.prompt_tokens) / duration,
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (also used as the `turnout bench engine` subparser)."""
    p = parser or argparse.ArgumentParser(prog="turnout bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m", help="dummy model shape (random weights)")
    p.add_argument("--model", help="real weights instead of --shape: a GGUF path or store name (smollm2-135m), or an HF directory")
    p.add_argument("--workload", choices=("fixed", "sharegpt"), default="fixed")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (median for sharegpt)")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens (median for sharegpt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", choices=("none", "fp8"), default="none",
                   help="fp8: FP8 weights (per channel) and activations (per token), GEMMs on FP8 tensor cores (CUDA, compute capability 8.9+)")
    p.add_argument("--compare-quantization", action="store_true",
                   help="run the workload on the bf16 engine, then on an FP8 one (same weights), in one process")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto",
                   help="the KV pool's dtype: auto (the compute dtype) or fp8 (e4m3, half the bytes per block: twice the blocks)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs to split the model across (one rank each; NCCL); the roofline is then one GPU's")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    sched = p.add_mutually_exclusive_group()
    sched.add_argument("--sync-scheduling", action="store_true", help="no async scheduling (host work not overlapped with the GPU)")
    sched.add_argument("--async-scheduling", action="store_true", help="async scheduling on any device (the CPU's default is off)")
    p.add_argument("--json-schema", action="store_true", help="also run the workload constrained to a small JSON Schema (JSON_SCHEMA)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    p.add_argument("--hf-attn", default="sdpa", help="attn_implementation for the transformers peer")
    p.add_argument("--profile", action="store_true", help="torch.profiler over a few decode steps: GPU kernel time by category against the step's wall (CUDA)")
    p.add_argument("--host-profile", action="store_true", help="where the host's time per decode step goes: model calls against the rest, cProfile's top functions")
    p.add_argument("--profile-after", type=int, default=64, help="decode steps before the profiled ones")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run (no roofline, no peer)")
    p.add_argument("--json", dest="json_path", help="write the results here")
    return p


def print_table(report: dict[str, Any]) -> None:
    e = report["engine"]
    hf = report.get("transformers") or {}
    rf = e["roofline"]
    rows = [
        ("shape / workload", f"{e['shape']} / {e['workload']} ({e['num_requests']} req, {e['prompt_tokens']} prompt + {e['output_tokens']} output tok)"
         + (f", {e['quantization']}" if e.get("quantization") else "")
         + (f", {e['kv_cache_dtype']} KV cache" if e.get("kv_cache_dtype", "auto") != "auto" else "")
         + (f", tensor parallel x{e['tensor_parallel_size']}" if e.get("tensor_parallel_size", 1) > 1 else "")),
        ("output tok/s", f"{e['output_tok_s']:,.0f}"),
        ("total tok/s", f"{e['total_tok_s']:,.0f}"),
        ("duration", f"{e['duration_s']:.2f} s"),
        ("TTFT p50/p90/p99", "/".join(f"{e['ttft_ms'].get(k, 0):.0f}" for k in ("p50", "p90", "p99")) + " ms"),
        ("TPOT p50/p90/p99", "/".join(f"{e['tpot_ms'].get(k, 0):.2f}" for k in ("p50", "p90", "p99")) + " ms"),
        ("KV pool / peak usage", f"{e['kv_pool_gib']:.1f} GiB ({e['kv_pool_blocks']} blocks) / {100 * e['kv_usage_peak']:.1f} %"),
        ("decode step (wall / GPU)", f"{e['decode_step_ms'].get('mean', 0):.2f} / {e['decode_gpu_ms_mean']:.2f} ms at batch {e['decode_batch_mean']:.0f}, {e['graph_steps']} graph steps"),
        *roofline_rows(rf, report.get("limits") or {}),
    ]
    js = report.get("engine_json_schema")
    if js:
        rows.append(("output tok/s, JSON schema", f"{js['output_tok_s']:,.0f} ({js['output_tok_s'] / e['output_tok_s']:.2f}x; {js['output_tokens']} tok, "
                     f"{js['finished_stop']}/{js['num_requests']} complete, {js['valid_json']} valid)"))  # fmt: skip
        rows.append(("decode step, JSON schema", f"{js['decode_step_ms'].get('mean', 0):.2f} / {js['decode_gpu_ms_mean']:.2f} ms at batch {js['decode_batch_mean']:.0f}"))
    fp8 = report.get("engine_fp8")
    if fp8:
        rows.append(("output tok/s, fp8", f"{fp8['output_tok_s']:,.0f} ({fp8['output_tok_s'] / e['output_tok_s']:.2f}x; weights "
                     f"{fp8['roofline']['weight_bytes'] / 2**30:.2f} GiB against {rf['weight_bytes'] / 2**30:.2f})"))  # fmt: skip
        frf = fp8["roofline"]
        rows.append(("decode step, fp8", f"{fp8['decode_step_ms'].get('mean', 0):.2f} / {fp8['decode_gpu_ms_mean']:.2f} ms at batch {fp8['decode_batch_mean']:.0f}; "
                     f"floors: bytes {frf['bytes_floor_ms_per_step']:.2f} ms (wall {frf['wall_over_bytes_floor']:.2f}x), "
                     f"bytes+FLOPs {frf['op_floor_ms_per_step']:.2f} ms (wall {frf['wall_over_op_floor']:.2f}x)"))  # fmt: skip
        rows.append(("KV pool, fp8", f"{fp8['kv_pool_gib']:.1f} GiB ({fp8['kv_pool_blocks']} blocks)"))
    if hf.get("output_tok_s"):
        rows.append(("transformers generate_batch", f"{hf['output_tok_s']:,.0f} output tok/s ({hf['duration_s']:.1f} s, {hf['attn_implementation']})"))
        rows.append(("speed-up", f"{e['output_tok_s'] / hf['output_tok_s']:.1f}x"))
    elif hf:
        rows.append(("transformers", str(hf.get("skipped") or hf.get("error"))))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for key, title in (("profile", "GPU profile of the decode step"), ("host_profile", "host profile of the decode step")):
        for run, res in (("", e), (", fp8", fp8 or {})):
            if res.get(key):
                print_profile(title + run, res[key])


def roofline_rows(rf: dict[str, Any], limits: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's roofline rows: the device's limits (measured, and the data sheet's), both
    floors and the step's wall (and GPU time) over each. None on the CPU."""
    if not rf.get("copy_bandwidth_gb_s"):
        return []
    nominal = limits.get("nominal") or {}

    def beside(key: str, scale: float, unit: str) -> str:
        v = nominal.get(key)
        src = (limits.get("source") or {}).get(key, "")
        note = "" if src == "measured" else f", {src}"
        return f" (data sheet {v / scale:,.0f} {unit}{note})" if v else (f" ({src})" if note else "")

    fp8 = f"; fp8 {rf['fp8_tflops']:.0f} TFLOP/s{beside('fp8_flops', 1e12, 'TFLOP/s')}" if rf.get("fp8_tflops") else ""
    return [
        ("device limits", f"copy {rf['copy_bandwidth_gb_s']:,.0f} GB/s{beside('bandwidth', 1e9, 'GB/s')}; "
                          f"matmul {rf['matmul_tflops']:.0f} TFLOP/s{beside('matmul_flops', 1e12, 'TFLOP/s')}{fp8}"),
        ("roofline, bytes only", f"{rf['bytes_floor_ms_per_step']:.2f} ms/step; wall {rf['wall_over_bytes_floor']:.2f}x it, GPU time {rf['gpu_over_bytes_floor']:.2f}x"),
        ("roofline, bytes+FLOPs", f"{rf['op_floor_ms_per_step']:.2f} ms/step; wall {rf['wall_over_op_floor']:.2f}x it, GPU time {rf['gpu_over_op_floor']:.2f}x"),
        ("  per op at mean batch", ", ".join(f"{o['op']} {o['floor_ms']:.2f} ({o['bound']})" for o in rf.get("ops_at_mean_batch", []))),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print a table; write JSON when --json is given. 0 on success."""
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("turnout bench engine needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if args.device == "cuda" and torch.cuda.device_count() < args.tensor_parallel_size:
        print(f"turnout bench engine: --tensor-parallel-size {args.tensor_parallel_size} needs as many GPUs; this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    if args.compare_quantization or quantization(args) == "fp8":
        # Refused here, before any run: an FP8 engine on the CPU or on a GPU without FP8.
        error = fp8_refusal(args)
        if error:
            print(f"turnout bench engine: {error}", file=sys.stderr)
            return 2
    from backends.paged.loader import ModelSource, load_config_and_tokenizer

    cfg, tokenizer = load_config_and_tokenizer(ModelSource.parse(model_name(args)))
    # A real tokenizer's vocabulary may be narrower than the logits; its special ids are never drawn.
    vocab = min(cfg.vocab_size, getattr(tokenizer, "vocab_size", cfg.vocab_size))
    specials = tokenizer.special_token_ids() if hasattr(tokenizer, "special_token_ids") else ()
    work = make_workload(args.workload, args.num_requests, args.input_len, args.output_len, vocab, args.seed, exclude=specials)
    longest = max(len(p) + n for p, n in zip(work.prompts, work.output_lens))
    args.max_model_len = max(args.max_model_len, longest)
    fp8 = args.compare_quantization or quantization(args) == "fp8"
    limits = measure_limits(torch, getattr(torch, args.dtype, torch.bfloat16), fp8=fp8) if args.device == "cuda" else None
    if args.compare_quantization:
        args.quantization = "none"  # the first run is the bf16 one; the FP8 one follows
    result, engine = run_engine(args, work, limits)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "limits": limits.as_dict() if limits else {},
        "argv": sys.argv,
        "args": vars(args),
        "engine": asdict(result),
    }
    if args.json_schema:  # before the peer, which takes the engine's weights
        report["engine_json_schema"] = run_json_schema(engine, args, work, limits)
    if args.tensor_parallel_size > 1 and not args.no_transformers:
        report["transformers"] = {"skipped": "the transformers peer runs the whole model on one GPU: run it at --tensor-parallel-size 1"}
    elif not args.no_transformers and args.device == "cuda":
        try:
            report["transformers"] = run_transformers(engine, work, args)
        except Exception as exc:  # the peer failing must not lose our numbers
            report["transformers"] = {"error": f"{type(exc).__name__}: {exc}"}
        if report["transformers"].get("output_tok_s"):
            report["speedup_vs_transformers"] = result.output_tok_s / report["transformers"]["output_tok_s"]
    if args.compare_quantization:
        release_engine(engine)  # the peer may have taken its weights already; the rest goes here
        del engine
        fp8_result, engine = run_engine(argparse.Namespace(**{**vars(args), "quantization": "fp8"}), work, limits)
        report["engine_fp8"] = asdict(fp8_result)
        report["fp8_speedup"] = fp8_result.output_tok_s / result.output_tok_s
    engine.close()  # tensor-parallel ranks, if any
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2, default=str)
    print_table(report)
    return 0



if __name__ == "__main__":
    sys.exit(main())
