"""`turnout bench engine` on the CPU (a smoke run of the whole program on dummy:tiny) and its
workload generator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.bench.engine import main, make_workload


def test_workloads_are_seeded_and_shaped() -> None:
    fixed = make_workload("fixed", 8, 32, 16, vocab=320, seed=0)
    assert [len(p) for p in fixed.prompts] == [32] * 8 and fixed.output_lens == [16] * 8
    a = make_workload("sharegpt", 200, 64, 32, vocab=320, seed=1)
    b = make_workload("sharegpt", 200, 64, 32, vocab=320, seed=1)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    lens = np.array([len(p) for p in a.prompts])
    assert lens.min() >= 4 and lens.max() <= 8 * 64 and len(set(lens.tolist())) > 20
    assert 40 <= np.median(lens) <= 100  # median near input_len
    assert all(3 <= t < 320 for p in a.prompts for t in p)  # no special tokens


def test_bench_engine_smoke_run_on_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = main(["--shape", "tiny", "--device", "cpu", "--num-requests", "6", "--input-len", "20",
               "--output-len", "8", "--max-num-seqs", "4", "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    e = report["engine"]
    assert e["output_tokens"] == 6 * 8 and e["prompt_tokens"] == 6 * 20
    assert e["output_tok_s"] > 0 and e["ttft_ms"]["p50"] > 0 and e["tpot_ms"]["p50"] > 0
    assert e["decode_steps"] > 0 and e["decode_batch_mean"] <= 4
    assert "transformers" not in report  # no peer on the CPU
    assert "output tok/s" in capsys.readouterr().out


def test_bench_engine_json_schema_run_on_cpu(tmp_path, capsys) -> None:
    """--json-schema: the same workload constrained, reported beside the unconstrained run."""
    out = tmp_path / "bench.json"
    rc = main(["--shape", "tiny", "--device", "cpu", "--num-requests", "6", "--input-len", "20",
               "--output-len", "40", "--max-num-seqs", "4", "--json-schema", "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    e, js = report["engine"], report["engine_json_schema"]
    assert e["output_tokens"] == 6 * 40 and js["num_requests"] == 6 and js["prompt_tokens"] == e["prompt_tokens"]
    assert 6 <= js["output_tokens"] <= 6 * 40 and js["output_tok_s"] > 0
    assert js["valid_json"] == js["finished_stop"]  # every complete output parses and validates
    assert "output tok/s, JSON schema" in capsys.readouterr().out


def test_bench_engine_refuses_fp8_on_the_cpu_before_running(capsys) -> None:
    for flag in (["--quantization", "fp8"], ["--compare-quantization"]):
        rc = main(["--shape", "tiny", "--device", "cpu", "--num-requests", "2", *flag])
        assert rc == 2
        captured = capsys.readouterr()
        assert "quantization: fp8 runs on CUDA GPUs" in captured.err and "output tok/s" not in captured.out


def test_bench_engine_compare_quantization_runs_twice_in_one_process(tmp_path, capsys, monkeypatch) -> None:
    """The plumbing of --compare-quantization on the CPU: the second engine is built after the
    first one's memory is released, and reported beside it. (FP8 itself needs the GPU: here both
    runs are unquantized.)"""
    import gateway.bench.engine as bench

    built: list[str | None] = []
    real_quantization = bench.quantization

    def no_fp8(args):
        q = real_quantization(args)
        built.append(q)
        return None

    monkeypatch.setattr(bench, "fp8_refusal", lambda args: None)
    monkeypatch.setattr(bench, "quantization", no_fp8)
    out = tmp_path / "bench.json"
    rc = main(["--shape", "tiny", "--device", "cpu", "--num-requests", "4", "--input-len", "12", "--output-len", "6",
               "--max-num-seqs", "4", "--compare-quantization", "--json", str(out)])  # fmt: skip
    assert rc == 0
    assert built == [None, "fp8"]  # the bf16 run first, then the one asked for fp8
    report = json.loads(out.read_text())
    assert report["engine_fp8"]["output_tokens"] == report["engine"]["output_tokens"] == 4 * 6
    assert report["fp8_speedup"] > 0
    assert "output tok/s, fp8" in capsys.readouterr().out


def test_workload_never_draws_excluded_ids_and_keeps_the_default_draws() -> None:
    """A real tokenizer's special ids (SmolLM2's are 0..16) are never drawn; excluding only the
    ids the default range leaves out anyway changes no draw."""
    w = make_workload("fixed", 20, 64, 4, vocab=320, seed=3, exclude=set(range(17)))
    assert min(t for p in w.prompts for t in p) >= 17
    assert make_workload("fixed", 5, 16, 4, vocab=320, seed=3, exclude={0, 1, 2}).prompts == make_workload("fixed", 5, 16, 4, vocab=320, seed=3).prompts


def test_bench_engine_host_profile_and_model_option_on_cpu(tmp_path, capsys) -> None:
    """--model takes a model source instead of --shape (here dummy:tiny, the same loader path a
    GGUF takes); --host-profile splits the decode step's wall into the model's calls and the
    rest, with cProfile's top functions; the CPU has no roofline."""
    out = tmp_path / "bench.json"
    rc = main(["--model", "dummy:tiny", "--device", "cpu", "--num-requests", "4", "--input-len", "12", "--output-len", "24",
               "--max-num-seqs", "4", "--async-scheduling", "--host-profile", "--profile-after", "2", "--profile-steps", "5",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    e = report["engine"]
    assert e["shape"] == "dummy:tiny" and e["output_tokens"] == 4 * 24 and e["async_scheduling"]
    hp = e["host_profile"]
    assert hp["steps"] == 5 and hp["batch"] == 4
    assert hp["wall_ms_per_step"] >= hp["model_ms_per_step"] > 0
    assert hp["host_ms_per_step"] == pytest.approx(hp["wall_ms_per_step"] - hp["model_ms_per_step"])
    assert any("step" in r["function"] for r in hp["top_cumulative"])
    assert e["roofline"]["op_floor_ms_per_step"] == 0 and report["limits"] == {}
    printed = capsys.readouterr().out
    assert "host profile of the decode step" in printed and "roofline" not in printed


def test_bench_engine_on_the_real_smollm2_gguf_on_cpu(tmp_path) -> None:
    """Real weights through the engine's loader and the model's own tokenizer (skipped where
    the store has no SmolLM2: `turnout pull smollm2-135m`)."""
    from backends.models import ModelNotFound, resolve_model

    try:
        path = resolve_model("smollm2-135m")
    except ModelNotFound:
        pytest.skip("smollm2-135m is not in the model store")
    out = tmp_path / "bench.json"
    rc = main(["--model", str(path), "--device", "cpu", "--dtype", "float32", "--num-requests", "2", "--input-len", "8",
               "--output-len", "4", "--max-num-seqs", "2", "--json", str(out)])  # fmt: skip
    assert rc == 0
    e = json.loads(out.read_text())["engine"]
    assert e["shape"] == str(path) and e["output_tokens"] == 2 * 4 and e["prompt_tokens"] == 2 * 8
