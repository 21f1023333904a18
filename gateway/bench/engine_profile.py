"""What bounds a decode step: `bench engine --profile` (GPU kernels by category against the
step's wall) and `--host-profile` (where the host's Python time per step goes; CPU or GPU).

Both replay the benchmark's workload on the warmed-up engine, untimed, until `after` pure
decode steps have run (the batch full and steady), then look at the next `n` steps:

- GPU: torch.profiler's device activities (kernels, copies) per step, split into GEMM
  (cuBLAS/cuBLASLt incl. nvjet, CUTLASS, `_scaled_mm`), attention (our Triton paged-attention
  kernels and the KV write; SDPA/flash on the torch path) and other kernels; the GPU's busy
  time (the union of their intervals); and the step's wall without the profiler. Wall minus
  busy is host time the device did not overlap: when it is a large part of the wall, the step
  is host-bound whatever the kernels do.
- host: the step's wall, on the CPU the time inside the model's forward and logits calls
  (the model's compute; the rest is the host's work, sampling's argmax included), and
  cProfile's top functions by cumulative and by own time, per step.
"""

from __future__ import annotations

import cProfile
import pstats
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Kernel name -> category. cuBLAS(Lt) GEMMs are "nvjet_*" on Hopper with recent CUDA, else
# "*gemm*" / "sm90_xmma_*" / "cutlass*"; torch's row-wise `_scaled_mm` is a CUTLASS kernel
# ("f8f8bf16_rowwise"); our attention is Triton's `_decode_kernel`, `_merge_kernel`,
# `_prefill_kernel` and the KV write `_write_kv_kernel`.
_GEMM = re.compile(r"nvjet|gemm|xmma|cutlass|cublas|scaled_mm|f8f8bf16|splitkreduce|s16816|wgmma", re.IGNORECASE)
_ATTENTION = re.compile(r"_decode_kernel|_merge_kernel|_prefill_kernel|_write_kv_kernel|flash|fmha|attention|sdpa", re.IGNORECASE)
CATEGORIES = ("gemm", "attention", "other")


def kernel_category(name: str) -> str:
    """"gemm", "attention" or "other" for a device activity's name (see the module docstring)."""
    if _GEMM.search(name):
        return "gemm"
    if _ATTENTION.search(name):
        return "attention"
    return "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time the device was doing anything."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize_device_events(events: list[tuple[str, float, float]], steps: int, wall_s: float) -> dict[str, Any]:
    """Per-step device time by category, busy time, host time not overlapped, and the top
    kernels, from (name, start_us, end_us) of every device activity over `steps` steps whose
    unprofiled wall was `wall_s` seconds in all."""
    by_cat = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict[str, list[float]] = {}
    for name, s, e in events:
        by_cat[kernel_category(name)] += e - s
        acc = by_name.setdefault(name, [0.0, 0])
        acc[0] += e - s
        acc[1] += 1
    busy = busy_us([(s, e) for _, s, e in events])
    wall_ms = wall_s * 1e3 / steps
    busy_ms = busy / 1e3 / steps
    host_ms = max(0.0, wall_ms - busy_ms)
    kernels_ms = {k: v / 1e3 / steps for k, v in by_cat.items()}
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    largest = max(kernels_ms, key=lambda k: kernels_ms[k])
    return {
        "wall_ms_per_step": wall_ms,
        "gpu_kernel_ms_per_step": kernels_ms | {"total": sum(kernels_ms.values())},
        "gpu_busy_ms_per_step": busy_ms,
        "host_not_overlapped_ms_per_step": host_ms,
        "gpu_busy_fraction": busy_ms / wall_ms if wall_ms else 0.0,
        # The step is host-bound when the device idles for more than a fifth of it.
        "bound_by": "host" if host_ms > 0.2 * wall_ms else f"GPU: {largest}",
        "top_kernels": [
            {"name": name[:90], "category": kernel_category(name), "ms_per_step": us / 1e3 / steps, "calls_per_step": c / steps}
            for name, (us, c) in top
        ],
    }


def replay_to_decode(engine: Any, reqs: list[Any], after: int) -> None:
    """Add `reqs` again (new ids: the prefix cache may serve their prompts) and step, untimed,
    until `after` pure-decode steps have run or the work runs out."""
    for r in reqs:
        engine.add_request(replace(r, request_id="prof-" + r.request_id))
    seen = 0
    while engine.has_unfinished() and seen < after:
        engine.step()
        if engine.last_step is not None and engine.last_step.num_prefill_tokens == 0:
            seen += 1


def abort_all(engine: Any) -> None:
    """Drop whatever the replay left (its requests' blocks go back to the pool)."""
    for rid in list(engine.requests):
        engine.abort(rid)


def gpu_profile(engine: Any, torch: Any, reqs: list[Any], after: int, n: int) -> dict[str, Any]:
    """The GPU profile (module docstring) of n decode steps after `after`; aborts the rest."""
    from torch.profiler import ProfilerActivity, profile

    replay_to_decode(engine, reqs, after)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        engine.step()
    torch.cuda.synchronize()
    plain_wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
        profiled_wall = time.perf_counter() - t0
    batch = engine.last_step.num_decodes if engine.last_step else 0
    host = host_profile_steps(engine, n, model_split=False)
    abort_all(engine)
    events = [
        (ev.name, float(ev.time_range.start), float(ev.time_range.end))
        for ev in prof.events()
        if str(getattr(ev, "device_type", "")).endswith("CUDA")  # kernels, copies, memsets
    ]
    out = summarize_device_events(events, n, plain_wall)
    return {"steps": n, "batch": batch, "wall_ms_per_step_profiled": profiled_wall * 1e3 / n, **out,
            "host_top_ms_per_step": host["top_cumulative"]}  # fmt: skip


def host_profile(engine: Any, reqs: list[Any], after: int, n: int) -> dict[str, Any]:
    """The host profile (module docstring) of n decode steps after `after`; aborts the rest."""
    replay_to_decode(engine, reqs, after)
    # The model's calls are its compute only on the CPU; on CUDA they launch kernels (or replay
    # a graph, not calling them at all), so there the split would mean nothing.
    out = host_profile_steps(engine, n, model_split=engine.device.type == "cpu")
    abort_all(engine)
    return out


def host_profile_steps(engine: Any, n: int, *, model_split: bool = True, top: int = 15) -> dict[str, Any]:
    """Run n steps timed (the model's forward and logits calls timed apart with `model_split`),
    then n more under cProfile; per-step numbers."""
    batch = engine.last_step.num_decodes if engine.last_step else 0
    model_s = [0.0]
    model = engine.runner.model
    restore: list[tuple[str, Any, bool]] = []  # (name, what it was, whether the instance held it)
    if model_split and model is not None:
        for attr in ("forward", "logits"):
            inner = getattr(model, attr)
            restore.append((attr, inner, attr in vars(model)))
            setattr(model, attr, _timed(inner, model_s))
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        wall = time.perf_counter() - t0
    finally:
        for attr, inner, own in restore:
            if own:
                setattr(model, attr, inner)
            else:
                delattr(model, attr)  # the class's method shows again
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        engine.step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def rows(key: int) -> list[dict[str, Any]]:
        ranked = sorted(stats.items(), key=lambda kv: -kv[1][key])[:top]
        return [
            {"function": f"{Path(f).name}:{line}({fn})", "cum_ms": v[3] * 1e3 / n, "self_ms": v[2] * 1e3 / n, "calls": v[1] / n}
            for (f, line, fn), v in ranked
        ]

    out: dict[str, Any] = {"steps": n, "batch": batch, "wall_ms_per_step": wall * 1e3 / n}
    if model_split:
        out["model_ms_per_step"] = model_s[0] * 1e3 / n
        out["host_ms_per_step"] = (wall - model_s[0]) * 1e3 / n
    return out | {"top_cumulative": rows(3), "top_self": rows(2)}


def _timed(fn: Any, acc: list[float]) -> Any:
    """fn, adding the seconds each call takes to acc[0]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t

    return wrapper


def print_profile(title: str, prof: dict[str, Any]) -> None:
    """A small table of a profile: the GPU split, or the host's wall, model and top functions."""
    print(f"\n{title} (batch {prof.get('batch')}, {prof.get('steps')} steps)")
    if "gpu_kernel_ms_per_step" in prof:
        k = prof["gpu_kernel_ms_per_step"]
        rows = [("step wall (unprofiled)", prof["wall_ms_per_step"]), ("GPU kernels: GEMM", k["gemm"]), ("GPU kernels: attention", k["attention"]),
                ("GPU kernels: other", k["other"]), ("GPU busy", prof["gpu_busy_ms_per_step"]),
                ("host, not overlapped", prof["host_not_overlapped_ms_per_step"])]  # fmt: skip
        for name, ms in rows:
            print(f"  {name:<24} {ms:8.3f} ms/step")
        print(f"  {'bound by':<24} {prof['bound_by']}")
        return
    print(f"  {'step wall':<24} {prof['wall_ms_per_step']:8.3f} ms/step")
    if "model_ms_per_step" in prof:
        print(f"  {'model forward+logits':<24} {prof['model_ms_per_step']:8.3f} ms/step")
        print(f"  {'host (the rest)':<24} {prof['host_ms_per_step']:8.3f} ms/step")
    print("  cProfile, by cumulative time (ms/step, inflated by the profiler):")
    for r in prof["top_cumulative"][:12]:
        print(f"    {r['cum_ms']:7.3f} cum {r['self_ms']:7.3f} self {r['calls']:7.0f} calls  {r['function']}")
