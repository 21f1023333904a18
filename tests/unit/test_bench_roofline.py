"""The decode step's floors (gateway/bench/roofline.py) and the profile's kernel accounting
(gateway/bench/engine_profile.py): pure arithmetic, checked on the CPU with weights that hold
shapes but no memory (meta tensors)."""

from __future__ import annotations

import pytest
import torch

from backends.paged.config import dummy_config
from backends.paged.kv_cache import bytes_per_block
from backends.paged.weights import LayerWeights, ModelWeights
from gateway.bench.engine_profile import busy_us, kernel_category, summarize_device_events
from gateway.bench.roofline import DeviceLimits, decode_ops, measure_limits, nominal_limits, ops_table, step_floor


def meta_weights(shape: str) -> ModelWeights:
    """A shape's weights as bf16 meta tensors: sizes without storage."""
    c = dummy_config(shape)
    H, I, hd = c.hidden_size, c.intermediate_size, c.head_dim

    def t(*dims: int) -> torch.Tensor:
        return torch.empty(*dims, dtype=torch.bfloat16, device="meta")

    layer = LayerWeights(
        attn_norm=t(H), qkv=t((c.num_heads + 2 * c.num_kv_heads) * hd, H), qkv_bias=None, o=t(H, c.num_heads * hd),
        ffn_norm=t(H), gate_up=t(2 * I, H), down=t(H, I),
    )  # fmt: skip
    embed = t(c.vocab_size, H)
    return ModelWeights(embed=embed, lm_head=embed if c.tie_word_embeddings else t(c.vocab_size, H), final_norm=t(H), layers=[layer] * c.num_layers)


def test_llama3_8b_at_batch_256_is_compute_bound_in_its_gemms_and_bytes_bound_in_attention() -> None:
    """The issue's arithmetic: 2 x 8e9 x 256 FLOPs of GEMMs take longer at ~790 TFLOP/s than
    reading the weights at 4.8 TB/s, so the honest floor exceeds the bytes-only one."""
    c = dummy_config("llama3-8b")
    w = meta_weights("llama3-8b")
    limits = DeviceLimits(bandwidth=4.8e12, matmul_flops=790e12)
    kv = bytes_per_block(c, 1, torch.bfloat16)
    batch, ctx = 256, 256 * 384
    ops = {op.name: op for op in decode_ops(w, c, kv, batch, ctx, limits)}

    per_layer = sum(getattr(w.layers[0], n).numel() for n in ("qkv", "o", "gate_up", "down"))
    gemm_flops = sum(ops[n].flops for n in ("qkv", "o", "gate_up", "down"))
    assert gemm_flops == 2 * per_layer * c.num_layers * batch
    assert ops["lm_head"].flops == 2 * c.vocab_size * c.hidden_size * batch
    assert ops["attention"].flops == 4 * c.num_heads * c.head_dim * ctx * c.num_layers
    assert ops["attention"].bytes >= ctx * kv  # every context token's K and V, all layers

    table = {row["op"]: row for row in ops_table(list(ops.values()), limits.bandwidth)}
    assert all(table[n]["bound"] == "FLOPs" for n in ("qkv", "o", "gate_up", "down", "lm_head"))
    assert table["attention"]["bound"] == "bytes"

    floor = step_floor(list(ops.values()), limits.bandwidth)
    assert floor.op_s > floor.bytes_s
    expected = sum(max(op.bytes / 4.8e12, op.flops / 790e12) for op in ops.values())
    assert floor.op_s == pytest.approx(expected)
    # About the estimate: GEMMs ~4.9 ms at 790 TFLOP/s plus ~2.7 ms of KV.
    assert 7.0e-3 < floor.op_s < 8.5e-3


def test_fp8_weights_count_one_byte_and_the_fp8_peak() -> None:
    from backends.paged.fp8 import Fp8Weight

    c = dummy_config("tiny")
    w = meta_weights("tiny")
    layer = w.layers[0]
    n, k = layer.gate_up.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
    fp8_layer = LayerWeights(layer.attn_norm, layer.qkv, None, layer.o, layer.ffn_norm, Fp8Weight(q, torch.empty(1, n, device="meta")), layer.down)
    w8 = ModelWeights(w.embed, w.lm_head, w.final_norm, [fp8_layer] * c.num_layers)
    limits = DeviceLimits(bandwidth=1e12, matmul_flops=1e15, fp8_flops=2e15)
    ops16 = {op.name: op for op in decode_ops(w, c, 64.0, 8, 100, limits)}
    ops8 = {op.name: op for op in decode_ops(w8, c, 64.0, 8, 100, limits)}
    weight16 = n * k * 2 * c.num_layers
    weight8 = (n * k + n * 4) * c.num_layers  # values plus float32 scales
    assert ops16["gate_up"].bytes - ops8["gate_up"].bytes == weight16 - weight8
    assert ops8["gate_up"].peak == 2e15 and ops8["o"].peak == 1e15


def test_nominal_limits_by_device_name() -> None:
    assert nominal_limits("NVIDIA H200") == (4.8e12, 989e12, 1979e12)
    assert nominal_limits("NVIDIA H100 80GB HBM3")[0] == 3.35e12  # SXM
    assert nominal_limits("NVIDIA H100 PCIe")[0] == 2.0e12
    assert nominal_limits("a CPU") is None


def test_limits_fall_back_to_the_data_sheet_when_a_probe_fails(monkeypatch) -> None:
    """On this CPU every probe fails (no CUDA): each number is the data sheet's, said so."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    limits = measure_limits(torch, torch.bfloat16, fp8=True)
    assert (limits.bandwidth, limits.matmul_flops, limits.fp8_flops) == (4.8e12, 989e12, 1979e12)
    assert all(src.startswith("nominal") for src in limits.source.values()) and len(limits.source) == 3
    assert limits.nominal["bandwidth"] == 4.8e12


def test_kernel_categories() -> None:
    gemm = ["nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64",
            "void cutlass::device_kernel<f8f8bf16_rowwise>", "ampere_bf16_s16816gemm_bf16_128x64", "void splitKreduce_kernel<32, 16>"]  # fmt: skip
    attention = ["_decode_kernel", "_merge_kernel", "_prefill_kernel", "_write_kv_kernel", "pytorch_flash::flash_fwd_kernel"]
    other = ["_rms_norm_kernel", "_silu_and_mul_kernel", "Memcpy HtoD (Pinned -> Device)", "void at::native::reduce_kernel<argmax>"]
    assert [kernel_category(k) for k in gemm] == ["gemm"] * len(gemm)
    assert [kernel_category(k) for k in attention] == ["attention"] * len(attention)
    assert [kernel_category(k) for k in other] == ["other"] * len(other)


def test_busy_time_is_the_union_of_intervals() -> None:
    assert busy_us([]) == 0
    assert busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 12 + 5


def test_summary_says_host_bound_when_the_gpu_idles_and_names_the_largest_category_otherwise() -> None:
    # Two steps of 1 ms wall: kernels 0.3 ms a step, the device idle most of the time.
    idle = [("nvjet_a", 0, 200), ("_decode_kernel", 200, 300), ("nvjet_a", 1000, 1200), ("_decode_kernel", 1200, 1300)]
    s = summarize_device_events(idle, steps=2, wall_s=2e-3)
    assert s["gpu_kernel_ms_per_step"]["gemm"] == pytest.approx(0.2) and s["gpu_kernel_ms_per_step"]["attention"] == pytest.approx(0.1)
    assert s["gpu_busy_ms_per_step"] == pytest.approx(0.3) and s["host_not_overlapped_ms_per_step"] == pytest.approx(0.7)
    assert s["bound_by"] == "host"
    busy = [("nvjet_a", 0, 600), ("_decode_kernel", 600, 950), ("_rms_norm_kernel", 950, 990)]
    s = summarize_device_events(busy, steps=1, wall_s=1e-3)
    assert s["bound_by"] == "GPU: gemm" and s["top_kernels"][0]["category"] == "gemm"


def test_report_gives_both_rooflines_and_the_wall_over_each(capsys) -> None:
    """decode_roofline and the printed table on a CUDA-shaped report, built on the CPU: a fake
    engine holding llama3-8b's shapes, two decode steps at batch 256."""
    from types import SimpleNamespace

    from gateway.bench.engine import decode_roofline, print_table
    from gateway.bench.engine_profile import summarize_device_events

    c = dummy_config("llama3-8b")
    engine = SimpleNamespace(model=SimpleNamespace(w=meta_weights("llama3-8b")), runner=SimpleNamespace(local_config=c), dtype=torch.bfloat16)
    limits = DeviceLimits(bandwidth=4.8e12, matmul_flops=790e12, source={"bandwidth": "measured", "matmul_flops": "measured"},
                          nominal={"bandwidth": 4.8e12, "matmul_flops": 989e12, "fp8_flops": 1979e12})  # fmt: skip
    steps = [(11e-3, 10e-3, 256, 256 * 380), (11e-3, 10e-3, 256, 256 * 390)]  # (wall s, GPU s, batch, context)
    rf = decode_roofline(engine, steps, limits)
    assert rf["op_floor_ms_per_step"] > rf["bytes_floor_ms_per_step"] > 0
    assert rf["wall_over_op_floor"] == pytest.approx(11 / rf["op_floor_ms_per_step"])
    assert rf["wall_over_bytes_floor"] == pytest.approx(11 / rf["bytes_floor_ms_per_step"])
    assert rf["gpu_over_op_floor"] == pytest.approx(10 / rf["op_floor_ms_per_step"])
    assert {o["op"] for o in rf["ops_at_mean_batch"]} == {"qkv", "o", "gate_up", "down", "lm_head", "embed", "attention"}
    assert rf["floor_ms_per_step"] > 0  # the older all-weights floor stays for comparison

    profile = summarize_device_events([("nvjet_x", 0, 6000), ("_decode_kernel", 6000, 9000)], steps=1, wall_s=11e-3)
    e = {"shape": "llama3-8b", "workload": "fixed", "num_requests": 256, "prompt_tokens": 1, "output_tokens": 1, "output_tok_s": 1.0,
         "total_tok_s": 1.0, "duration_s": 1.0, "ttft_ms": {}, "tpot_ms": {}, "kv_pool_gib": 1.0, "kv_pool_blocks": 1, "kv_usage_peak": 0.5,
         "decode_step_ms": {"mean": 11.0}, "decode_gpu_ms_mean": 10.0, "decode_batch_mean": 256, "graph_steps": 2, "roofline": rf,
         "profile": {"steps": 1, "batch": 256, **profile}}  # fmt: skip
    print_table({"engine": e, "limits": limits.as_dict()})
    out = capsys.readouterr().out
    assert "roofline, bytes only" in out and "roofline, bytes+FLOPs" in out and "data sheet 989 TFLOP/s" in out
    assert "GPU kernels: GEMM" in out and "host, not overlapped" in out and "bound by" in out
