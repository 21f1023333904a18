"""Tensor parallelism on the CPU: two gloo ranks (this process is rank 0, a second process
rank 1) against the single-rank engine on the same random weights.

Greedy tokens must be equal and the logits of every step within 1e-5 (relative, fp32), through
chunked prefill (prompts longer than the step's token budget), decodes and preemption (a KV
pool too small for every sequence), with KV heads sharded (tiny: 4 query / 2 KV heads) and
replicated (one KV head on two ranks, with an odd vocabulary padded, qkv bias and tied
embeddings), with and without async scheduling. Then the shard arithmetic, the option checks,
FP8 after sharding, and an engine worker that serves a completion on two ranks and leaves no
process behind, whether it is closed or killed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.config import ModelConfig, dummy_config
from backends.paged.engine import LLMEngine
from backends.paged.fp8 import Fp8Weight, quantize_model
from backends.paged.options import EngineOptions
from backends.paged.parallel import ShardLayout
from backends.paged.shard import selector
from backends.paged.tokenizer import ByteTokenizer
from backends.paged.weights import pack_weights, random_tensors

from .conftest import assert_blocks_all_free

pytestmark = pytest.mark.timeout(120)

TINY = dummy_config("tiny")  # 4 query heads, 2 KV heads: one KV head per rank
# One KV head on two ranks (replicated), a vocabulary that two ranks split only with a padding
# row, qkv bias (Qwen2) and the lm_head tied to the embeddings.
ONE_KV = replace(TINY, arch="qwen2", num_kv_heads=1, vocab_size=321, qkv_bias=True, tie_word_embeddings=True)

# 20 blocks of 4 tokens cannot hold six sequences of up to 52 tokens (preemption); a budget
# of 16 tokens a step splits the longer prompts into chunks.
OPTIONS: dict[str, Any] = dict(block_size=4, num_blocks=20, max_num_batched_tokens=16, max_num_seqs=6, watermark=0.0, num_threads=1)
MAX_TOKENS = 12
RTOL = 1e-5


def prompts(n: int, vocab: int, seed: int = 0, lo: int = 10, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy(rid: str, prompt: list[int], n: int = MAX_TOKENS) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    """The engines here run one intra-op thread a rank (two cores, two ranks); the process's
    setting is put back afterwards."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def engines() -> Iterator[Callable[..., LLMEngine]]:
    """Build engines on a config (dummy weights); each is closed, its ranks gone and its
    blocks all free afterwards."""
    built: list[LLMEngine] = []

    def make(config: ModelConfig, **options: Any) -> LLMEngine:
        engine = LLMEngine.from_model("dummy:tiny", config=config, tokenizer=ByteTokenizer(config.vocab_size), **{**OPTIONS, **options})
        built.append(engine)
        return engine

    try:
        yield make
    finally:
        for engine in built:
            engine.close()
    for engine in built:
        if engine.ranks is not None:
            assert all(p.poll() is not None for p in engine.ranks.procs), "a rank outlived close()"
        assert_blocks_all_free(engine)


def record_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Every step's logits (rank 0's, gathered from the ranks' vocabulary slices), in order."""
    seen: list[torch.Tensor] = []
    forward = engine.runner.forward

    def recording(inp: Any, pooled: Any = None) -> torch.Tensor:
        logits = forward(inp, pooled)
        seen.append(logits.detach().clone())
        return logits

    engine.runner.forward = recording  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize(
    ("config", "async_scheduling"),
    [(TINY, False), (TINY, True), (ONE_KV, False)],
    ids=["kv-sharded", "kv-sharded-async", "kv-replicated-padded-vocab"],
)
def test_two_ranks_equal_one_through_chunked_prefill_decode_and_preemption(engines, config: ModelConfig, async_scheduling: bool) -> None:
    ps = prompts(6, config.vocab_size, seed=3)
    assert max(len(p) for p in ps) > OPTIONS["max_num_batched_tokens"], "some prompt must be chunked"
    one = engines(config, async_scheduling=async_scheduling)
    two = engines(config, async_scheduling=async_scheduling, tensor_parallel_size=2)
    assert two.runner.local_config.num_kv_heads == 1 and two.runner.tp is not None
    assert two.runner.local_config.num_heads == 2 and two.runner.local_config.intermediate_size == config.intermediate_size // 2
    assert two.model.w.embed.shape[0] == -(-config.vocab_size // 2)  # this rank's vocabulary rows
    ref_logits, tp_logits = record_logits(one), record_logits(two)
    tp = two.runner.tp
    broadcast, fed = tp.broadcast, []  # ids sampled on rank 0 and sent to rank 1 (async scheduling)
    tp.broadcast = lambda x: fed.append(x.shape[0]) or broadcast(x)  # type: ignore[method-assign]

    ref = one.generate_sync([greedy(f"r{i}", p) for i, p in enumerate(ps)])
    got = two.generate_sync([greedy(f"r{i}", p) for i, p in enumerate(ps)])

    assert one.scheduler.num_preemptions > 0 and two.scheduler.num_preemptions == one.scheduler.num_preemptions
    assert got == ref
    assert all(len(t) == MAX_TOKENS for t in got.values())
    assert bool(fed) == async_scheduling
    assert len(tp_logits) == len(ref_logits) > 0  # the same plans, step by step
    worst = 0.0
    for a, b in zip(tp_logits, ref_logits):
        assert a.shape == b.shape == (b.shape[0], config.vocab_size)
        if b.numel():  # a step of prefill chunks alone samples nothing
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    print(f"largest logit difference: {worst:.2e} of the logits' scale")
    assert worst <= RTOL, f"logits differ by {worst:.2e} of their scale"


def test_a_rank_that_dies_fails_the_next_step_and_close_reaps_everything(engines) -> None:
    engine = engines(TINY, tensor_parallel_size=2)
    assert engine.ranks is not None
    (rank1,) = engine.ranks.procs
    os.kill(rank1.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.ranks.tp.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.ranks.tp.failure is not None and "SIGKILL" in engine.ranks.tp.failure
    engine.add_request(greedy("r", [1, 2, 3]))
    with pytest.raises(RuntimeError, match="rank 1 .* exited"):
        engine.step()
    engine.abort("r")


# -- without processes: the arithmetic, the checks, FP8 after sharding --------------------------


@pytest.mark.parametrize(("heads", "kv_heads", "size"), [(4, 2, 2), (32, 8, 4), (4, 1, 2), (8, 2, 4), (8, 2, 8)])
def test_each_rank_holds_the_kv_heads_its_query_heads_read(heads: int, kv_heads: int, size: int) -> None:
    group = heads // kv_heads
    config = replace(TINY, num_heads=heads, num_kv_heads=kv_heads)
    held: list[int] = []
    for rank in range(size):
        layout = ShardLayout.for_model(config, rank, size)
        assert len(layout.heads) == heads // size
        assert {h // group for h in layout.heads} <= set(layout.kv_heads)
        assert len(layout.kv_heads) == max(1, kv_heads // size)
        held += list(layout.kv_heads)
    assert set(held) == set(range(kv_heads))  # every KV head somewhere; replicated when size > kv_heads


@pytest.mark.parametrize("config", [TINY, ONE_KV], ids=["tiny", "one-kv"])
def test_the_ranks_slices_make_the_whole_model(config: ModelConfig) -> None:
    whole = random_tensors(config, seed=5)
    parts = [random_tensors(config, seed=5, select=selector(ShardLayout.for_model(config, r, 2), config.head_dim)) for r in range(2)]
    layer = "model.layers.0."
    for name, dim in [
        (layer + "self_attn.o_proj.weight", 1),
        (layer + "mlp.gate_proj.weight", 0),
        (layer + "mlp.up_proj.weight", 0),
        (layer + "mlp.down_proj.weight", 1),
        (layer + "self_attn.q_proj.weight", 0),
    ]:
        assert torch.equal(torch.cat([p[name] for p in parts], dim), whole[name]), name
    k = layer + "self_attn.k_proj.weight"
    if config.num_kv_heads >= 2:
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    else:  # replicated: each rank holds the one KV head whole
        assert all(torch.equal(p[k], whole[k]) for p in parts)
    vocab = torch.cat([p["model.embed_tokens.weight"] for p in parts])
    assert vocab.shape[0] == 2 * -(-config.vocab_size // 2)
    assert torch.equal(vocab[: config.vocab_size], whole["model.embed_tokens.weight"])
    assert not vocab[config.vocab_size :].any()  # padding rows are zero
    assert torch.equal(parts[1][layer + "input_layernorm.weight"], whole[layer + "input_layernorm.weight"])


def test_safetensors_are_cut_as_they_are_read(tmp_path) -> None:
    from safetensors.torch import save_file

    from backends.paged.weights import load_safetensors

    whole = random_tensors(ONE_KV, seed=1)
    save_file(whole, str(tmp_path / "model.safetensors"))
    select = selector(ShardLayout.for_model(ONE_KV, 1, 2), ONE_KV.head_dim)
    assert select is not None
    got = load_safetensors(tmp_path, select)
    assert got.keys() == whole.keys()
    assert all(torch.equal(got[k], select(k, whole[k])) for k in whole)


def test_tensor_parallel_size_is_checked_against_the_shape() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineOptions.from_dict({"tensor_parallel_size": 0})
    shape = dict(num_heads=8, num_kv_heads=2, intermediate_size=64)
    EngineOptions(tensor_parallel_size=4).check_tensor_parallel(**shape)
    EngineOptions(tensor_parallel_size=8).check_tensor_parallel(**shape)  # KV heads replicated 4 times
    with pytest.raises(ValueError, match="tensor_parallel_size: 3 does not divide the model's 8 attention heads"):
        EngineOptions(tensor_parallel_size=3).check_tensor_parallel(**shape)
    with pytest.raises(ValueError, match="intermediate size 60"):
        EngineOptions(tensor_parallel_size=8).check_tensor_parallel(num_heads=8, num_kv_heads=2, intermediate_size=60)
    with pytest.raises(ValueError, match="3 KV heads: one must divide the other"):
        EngineOptions(tensor_parallel_size=2).check_tensor_parallel(num_heads=6, num_kv_heads=3, intermediate_size=64)
    # Refused before any rank starts.
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLMEngine.from_model("dummy:tiny", tensor_parallel_size=3, num_blocks=8)


def test_fp8_quantizes_each_ranks_slice() -> None:
    """Quantizing after the cut: a column-parallel layer's per-channel scales are the whole
    model's for the rank's rows; a row-parallel layer's rank products sum to about the whole."""
    config = TINY
    whole = quantize_model(pack_weights(random_tensors(config, seed=2), config, torch.float32, torch.device("cpu")))
    ranks = [
        quantize_model(pack_weights(random_tensors(config, seed=2, select=selector(ShardLayout.for_model(config, r, 2), config.head_dim)), config, torch.float32, torch.device("cpu")))
        for r in range(2)
    ]  # fmt: skip
    I = config.intermediate_size
    for r, w in enumerate(ranks):
        gate_up = w.layers[0].gate_up
        assert isinstance(gate_up, Fp8Weight) and gate_up.shape == (I, config.hidden_size)
        rows = list(range(r * I // 2, (r + 1) * I // 2))
        full_scale = whole.layers[0].gate_up.scale[0]  # type: ignore[union-attr]
        assert torch.equal(gate_up.scale[0], torch.cat([full_scale[rows], full_scale[[I + i for i in rows]]]))
    x = torch.randn(3, I)
    down_whole = whole.layers[0].down.dequantize()  # type: ignore[union-attr]
    parts = sum(x[:, r * I // 2 : (r + 1) * I // 2] @ w.layers[0].down.dequantize().T for r, w in enumerate(ranks))  # type: ignore[union-attr]
    assert torch.allclose(parts, x @ down_whole.T, rtol=0.1, atol=0.1)


# -- through an engine worker process ----------------------------------------------------------


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


WORKER_OPTIONS = {"num_blocks": 64, "block_size": 4, "max_num_seqs": 4, "num_threads": 1}


async def test_an_engine_worker_serves_two_ranks_and_leaves_no_process_behind() -> None:
    from backends.paged.backend import PagedBackend
    from backends.protocol import CompletionRequest
    from backends.worker import messages as m
    from backends.worker.backend import WorkerBackend
    from backends.worker.process import WorkerProcess
    from gateway.registry import build_backend
    from policies.schema import BackendConfig

    request = CompletionRequest(model="tiny", prompt="hello there", max_tokens=8, temperature=0)
    reference = PagedBackend(name="one", model="dummy:tiny", **WORKER_OPTIONS)
    await reference.start()
    try:
        expected = (await reference.completion(request)).choices[0].text
    finally:
        await reference.close()

    # Served, then closed: the worker and its rank both gone.
    options = {**WORKER_OPTIONS, "tensor_parallel_size": 2}
    backend = build_backend(BackendConfig(name="tp", kind="paged", model="dummy:tiny", options=options))
    assert isinstance(backend, WorkerBackend)
    try:
        answer = await backend.completion(request)
        pid = backend.pid
        assert pid is not None
        ranks = children(pid)
        assert len(ranks) == 1, f"the worker should have one rank process, has {ranks}"
    finally:
        await backend.close()
    assert answer.choices[0].text == expected and answer.usage is not None and answer.usage.completion_tokens == 8
    await wait_until(lambda: gone(pid) and all(gone(r) for r in ranks))

    # Killed: its rank follows it out.
    spec = m.WorkerSpec(kind="paged", name="tp", model="dummy:tiny", model_id="tiny", options=options)
    worker = WorkerProcess(spec, on_load=lambda _: None, on_exit=lambda _: None)
    try:
        await worker.start(120)
        assert worker.pid is not None
        ranks = children(worker.pid)
        assert len(ranks) == 1
        os.kill(worker.pid, signal.SIGKILL)
        await wait_until(lambda: all(gone(r) for r in ranks), 10)
        await wait_until(lambda: not worker.alive, 10)
    finally:
        if worker.alive:
            await worker.kill()
        await worker.stop()  # its sockets and directory


async def test_a_rank_that_dies_restarts_its_engine_worker() -> None:
    """The worker exits (code 70) when one of its ranks dies, so the gateway's restart brings
    the engine back whole: its requests meanwhile get 502s, as for any worker that dies."""
    from backends.protocol import CompletionRequest
    from gateway.registry import build_backend
    from policies.schema import BackendConfig

    request = CompletionRequest(model="tiny", prompt="hello there", max_tokens=4, temperature=0)
    options = {**WORKER_OPTIONS, "tensor_parallel_size": 2}
    backend = build_backend(BackendConfig(name="tp", kind="paged", model="dummy:tiny", options=options))
    pids: list[int] = []
    try:
        first = await backend.completion(request)
        pid = backend.pid
        assert pid is not None
        (rank,) = children(pid)
        pids += [pid, rank]
        os.kill(rank, signal.SIGKILL)
        await wait_until(lambda: backend.restarts == 1 and backend.state == "ready" and backend.pid not in (None, pid), 30)
        assert backend.last_exit == "exit code 70" and gone(pid)
        assert backend.pid is not None
        pids += [backend.pid, *children(backend.pid)]
        again = await backend.completion(request)
        assert again.choices[0].text == first.choices[0].text
    finally:
        await backend.close()
    await wait_until(lambda: all(gone(p) for p in pids))


def test_bench_engine_runs_two_ranks_on_the_cpu(tmp_path) -> None:
    """`--tensor-parallel-size 2` through the benchmark (gloo here; NCCL on GPUs), which closes
    the ranks when done."""
    import json

    from gateway.bench.engine import main

    out = tmp_path / "bench.json"
    before = set(children(os.getpid()))  # the session's servers, started by other tests
    rc = main(["--shape", "tiny", "--device", "cpu", "--num-requests", "4", "--input-len", "20", "--output-len", "6",
               "--max-num-seqs", "4", "--tensor-parallel-size", "2", "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["engine"]["tensor_parallel_size"] == 2 and report["engine"]["output_tokens"] == 4 * 6
    assert not [pid for pid in children(os.getpid()) if pid not in before and not gone(pid)], "the benchmark left a rank running"
