"""The GPU paths' host-side logic, run on the CPU: step inputs built with numpy, the decode
CUDA-graph runner's static buffers and padding rows (with graph capture replaced by a plain
call), and the batched sampler's fast path."""

from __future__ import annotations

import random

import torch

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.cuda_graphs import DecodeGraphRunner, graph_buckets
from backends.paged.sampler import SamplerState, sample, sample_batch
from backends.paged.scheduler import ScheduledSeq
from backends.paged.sequence import Sequence
from backends.paged.step_inputs import build_step_inputs

from .conftest import assert_blocks_all_free


def _seq(prompt: list[int], blocks: list[int], computed: int, output: list[int] | None = None) -> Sequence:
    s = Sequence("r", prompt, SamplingParams(max_tokens=4))
    s.block_table = blocks
    s.num_computed = computed
    s.output_ids = list(output or [])
    return s


def test_step_inputs_lay_out_prefill_chunks_then_decodes() -> None:
    bs = 4
    chunk = _seq(list(range(10, 20)), [7, 3, 9], computed=4)  # tokens 4..9 this step
    dec = _seq([5, 6, 7], [2], computed=3, output=[42])  # decodes token 42 at position 3
    inp = build_step_inputs([ScheduledSeq(chunk, 6)], [ScheduledSeq(dec, 1)], bs)
    assert inp.input_ids.tolist() == [14, 15, 16, 17, 18, 19, 42]
    assert inp.positions.tolist() == [4, 5, 6, 7, 8, 9, 3]
    # position p of a sequence lives in block_table[p // bs] at offset p % bs
    assert inp.slot_mapping.tolist() == [3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 9 * 4 + 1, 2 * 4 + 3]
    assert inp.context_lens.tolist() == [10, 4]
    assert inp.query_starts.tolist() == [0, 6]
    assert inp.block_tables.shape[1] % 16 == 0  # one stride class for the Triton kernels
    assert inp.block_tables[0, :3].tolist() == [7, 3, 9] and inp.block_tables[1, 0] == 2
    assert inp.sample_rows == [5, 6]  # the chunk reaches the prompt's end, so it samples too
    assert inp.num_prefills == 1 and inp.num_decodes == 1 and inp.num_prefill_tokens == 6


def test_graph_buckets_cover_every_batch_size() -> None:
    buckets = graph_buckets(256)
    assert buckets[0] == 1 and buckets[-1] == 256
    assert all(any(b >= n for b in buckets) for n in range(1, 257))
    assert graph_buckets(7)[-1] == 7


class _CallGraph:
    """Stands in for a captured CUDA graph: replay re-runs the captured function."""

    def __init__(self, fn, out: torch.Tensor) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


def _capture_without_cuda(runner: DecodeGraphRunner) -> None:
    for b in runner.buckets:
        meta = runner._meta(b)

        def fn(b: int = b, meta=meta) -> torch.Tensor:
            return runner.model.logits(runner.model.forward(runner.ids[:b], runner.pos[:b], meta, runner.cache))

        out = torch.empty(b, runner.model.config.vocab_size)
        runner._graphs[b] = (_CallGraph(fn, out), out)


def test_decode_graph_runner_padding_leaves_tokens_unchanged(make_engine) -> None:
    rng = random.Random(0)
    ps = [[1] + [rng.randrange(3, 300) for _ in range(rng.randrange(5, 40))] for _ in range(7)]

    def run(with_graphs: bool) -> tuple[dict[str, list[int]], int]:
        engine = make_engine(num_blocks=40, block_size=4, max_num_batched_tokens=16, max_num_seqs=7, watermark=0.0)
        if with_graphs:
            engine.runner.graphs = DecodeGraphRunner(
                engine.runner.model, engine.runner.cache, max_batch=7, max_blocks_per_seq=-(-engine.max_model_len // 4),
                max_context=engine.max_model_len, splits_for=lambda b, ctx: 1,
            )  # fmt: skip
            _capture_without_cuda(engine.runner.graphs)
        reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for i, p in enumerate(ps)]
        out = engine.generate_sync(reqs)
        assert_blocks_all_free(engine)
        return out, engine.counters.graph_steps

    plain, _ = run(False)
    graphed, graph_steps = run(True)
    assert graph_steps > 0
    # Batches of 3, 5, 6 run in buckets of 4 and 7: the padding rows must write no K/V.
    assert graphed == plain


def test_sample_batch_fast_path_and_fallback_agree_with_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    greedy = [SamplerState.create(SamplingParams(max_tokens=1, temperature=0.0), [1]) for _ in range(4)]
    assert [s.token_id for s in sample_batch(logits, greedy)] == logits.argmax(-1).tolist()

    def seeded() -> list[SamplerState]:
        return [SamplerState.create(SamplingParams(max_tokens=1, temperature=0.8, seed=7 + i), [1]) for i in range(4)]

    # Seeded rows need their own generators: the batch path must defer to `sample`.
    assert [s.token_id for s in sample_batch(logits, seeded())] == [s.token_id for s in sample(logits, seeded())]

    unseeded = [SamplerState.create(SamplingParams(max_tokens=1, temperature=1.0), [1]) for _ in range(4)]
    peaked = torch.full((4, 50), -1e4)
    peaked[torch.arange(4), torch.tensor([3, 9, 27, 49])] = 0.0
    assert [s.token_id for s in sample_batch(peaked, unseeded)] == [3, 9, 27, 49]
    assert all(s.logprob is None for s in sample_batch(logits, greedy))
