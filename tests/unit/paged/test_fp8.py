"""FP8 (`quantization: fp8`) on the CPU: the quantizers' scales and round-trip error, the FP8
GEMM (torch's CPU `_scaled_mm`) against a dequantized reference, the decoder running FP8
weights, the weights' byte count, and the refusals at config load and engine start. The GPU
half (the Triton quantizer, cuBLAS's FP8 GEMM, CUDA graphs, logits against bf16) is
tests/gpu/test_fp8.py."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

import backends.paged.fp8 as fp8
from backends.paged.config import dummy_config
from backends.paged.engine import LLMEngine
from backends.paged.fp8 import FP8_DTYPE, FP8_MAX, Fp8Weight, linear, quantize_model, quantize_rows, quantize_weight
from backends.paged.hf_compat import hf_state_dict
from backends.paged.model import LlamaModel
from backends.paged.options import EngineOptions
from backends.paged.weights import pack_weights, random_tensors

# e4m3 keeps 3 mantissa bits: a normal value is rounded to within half a step, 2^-4 of the
# binade's base, so within 2^-4 of itself; the subnormals below 2^-6 to within 2^-10 absolute.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_round_trip(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Every element of q * scale is within e4m3's rounding bound of x (in scaled units)."""
    xs = x.float() / scale
    err = (q.float() - xs).abs()
    bound = E4M3_REL * xs.abs() + E4M3_SUBNORMAL_ABS
    assert bool((err <= bound * 1.0001).all()), f"worst excess {(err - bound).max().item()}"


def test_quantize_weight_scales_each_output_channel_by_its_amax() -> None:
    w = torch.randn(48, 64, generator=gen(0)) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    q = quantize_weight(w)
    assert isinstance(q, Fp8Weight) and q.shape == w.shape
    assert q.qweight.dtype == FP8_DTYPE and q.qweight.is_contiguous()
    assert q.scale.shape == (1, 48) and q.scale.dtype == torch.float32
    torch.testing.assert_close(q.scale[0], w.abs().amax(dim=1) / FP8_MAX)
    # Each row's largest magnitude lands on e4m3's largest finite value: the whole range is used.
    assert torch.equal(q.qweight.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))
    assert_round_trip(w, q.qweight, q.scale.t())
    # The transpose is the column-major [K, N] operand the FP8 GEMM wants.
    assert q.qweight.t().stride() == (1, 64)


def test_weight_round_trip_error_on_random_data() -> None:
    w = torch.randn(256, 512, generator=gen(1)) * 0.02
    q = quantize_weight(w)
    deq = q.dequantize()
    rel = ((deq - w).norm() / w.norm()).item()
    # Gaussian data: ~2.5 % RMS relative error (3 mantissa bits), never near e4m3's 6.25 % bound.
    assert 0.01 < rel < 0.035, rel
    assert deq.dtype == torch.float32 and q.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_weight_quantization_in_chunks_equals_one_pass_and_handles_zero_rows() -> None:
    w = torch.randn(80, 32, generator=gen(2))
    w[5] = 0.0
    whole, chunked = quantize_weight(w), quantize_weight(w, rows_per_chunk=16)
    assert torch.equal(whole.qweight.view(torch.uint8), chunked.qweight.view(torch.uint8))
    assert torch.equal(whole.scale, chunked.scale)
    assert torch.isfinite(whole.scale).all() and whole.scale[0, 5] > 0
    assert torch.equal(whole.qweight[5].float(), torch.zeros(32))


def test_weight_shapes_the_fp8_gemm_cannot_take_are_refused() -> None:
    assert fp8.can_quantize(torch.empty(32, 64)) and not fp8.can_quantize(torch.empty(36, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        quantize_weight(torch.empty(32, 40))


def test_activations_are_scaled_per_token() -> None:
    x = torch.randn(7, 96, generator=gen(3), dtype=torch.float32).to(torch.bfloat16)
    x[2] *= 1000.0  # one token with huge activations
    x[4] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and q.is_contiguous()
    assert s.shape == (7, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s[:, 0], (x.float().abs().amax(dim=1) / FP8_MAX).clamp(min=fp8.MIN_AMAX / FP8_MAX))
    assert_round_trip(x, q, s)
    assert torch.equal(q[4].float(), torch.zeros(96))
    # Each token's quantization depends on that token alone: the outlier token changes no other row.
    q2, s2 = quantize_rows(torch.cat([x[:2], x[3:]]))
    assert torch.equal(s2, torch.cat([s[:2], s[3:]]))
    assert torch.equal(q2.view(torch.uint8), torch.cat([q[:2], q[3:]]).view(torch.uint8))


def test_activation_round_trip_error_on_random_data() -> None:
    x = torch.randn(64, 1024, generator=gen(4))
    q, s = quantize_rows(x)
    rel = ((q.float() * s - x).norm() / x.norm()).item()
    assert 0.01 < rel < 0.035, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_linear_equals_the_dequantized_reference(dtype: torch.dtype, with_bias: bool) -> None:
    """The FP8 GEMM (torch's CPU `_scaled_mm` here, cuBLAS on the GPU) computes exactly
    (x_fp8 * scale_x) @ (w_fp8 * scale_w).T (+ bias), rounded once to the output dtype."""
    g = gen(5)
    x = torch.randn(2, 9, 128, generator=g).to(dtype)  # leading dims are flattened and restored
    w = torch.randn(96, 128, generator=g) * 0.05
    bias = (torch.randn(96, generator=g) * 0.1).to(dtype) if with_bias else None
    wq = quantize_weight(w.to(dtype))
    out = linear(x, wq, bias)
    assert out.shape == (2, 9, 96) and out.dtype == dtype
    xq, xs = quantize_rows(x.reshape(-1, 128))
    ref = (xq.float() * xs) @ wq.dequantize().t()
    if bias is not None:
        ref = ref + bias.float()
    ref = ref.reshape(2, 9, 96)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # one rounding of the output
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol
    # Against the unquantized product: FP8's own error, a few percent on random data.
    exact = x.float() @ w.to(dtype).float().t() + (bias.float() if bias is not None else 0.0)
    assert ((out.float() - exact).norm() / exact.norm()).item() < 0.06


def test_linear_dispatches_plain_tensors_to_f_linear() -> None:
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_fp8_linear_uses_the_quantizer_it_is_given() -> None:
    calls = []

    def counting(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(x.shape))
        return quantize_rows(x)

    wq = quantize_weight(torch.randn(32, 48))
    linear(torch.randn(5, 48, dtype=torch.bfloat16), wq, quantize=counting)
    assert calls == [(5, 48)]


def tiny_weights(dtype: torch.dtype = torch.bfloat16):
    config = dummy_config("tiny")
    return config, pack_weights(random_tensors(config, seed=0), config, dtype, torch.device("cpu"))


def test_quantize_model_converts_every_linear_layer_and_keeps_embed_and_lm_head() -> None:
    config, weights = tiny_weights()
    before = weights.nbytes()
    embed, lm_head = weights.embed, weights.lm_head
    quantize_model(weights)
    assert weights.embed is embed and weights.lm_head is lm_head  # stay in bf16
    for layer in weights.layers:
        for name in fp8.LINEAR_FIELDS:
            assert isinstance(getattr(layer, name), Fp8Weight), name
        assert layer.attn_norm.dtype == torch.bfloat16
    linear_params = sum(math.prod(getattr(layer, n).shape) for layer in weights.layers for n in fp8.LINEAR_FIELDS)
    scales = sum(getattr(layer, n).shape[0] for layer in weights.layers for n in fp8.LINEAR_FIELDS)
    # One byte a weight instead of two, plus a float32 scale per output channel.
    assert weights.nbytes() == before - 2 * linear_params + linear_params + 4 * scales
    quantize_model(weights)  # twice is harmless
    assert weights.nbytes() == before - linear_params + 4 * scales


def test_the_decoder_runs_fp8_weights_through_the_fp8_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's forward pass (paged, through an engine) and its dense reference both run
    the FP8 layers, and give logits close to the bf16 model's."""
    config, weights = tiny_weights()
    _, bf16 = tiny_weights()
    quantize_model(weights)
    calls = {"n": 0}
    real = torch._scaled_mm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    ids = [5 + (7 * i) % 300 for i in range(40)]
    got = LlamaModel(config, weights, 256).dense_logits(ids)
    assert calls["n"] == 4 * config.num_layers
    ref = LlamaModel(config, bf16, 256).dense_logits(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.1
    # The paged engine with those weights: its forward pass goes through the FP8 GEMM as well.
    from backends.generation import GenerationRequest, SamplingParams
    from backends.paged.tokenizer import ByteTokenizer

    engine = LLMEngine(config, weights, ByteTokenizer(config.vocab_size), EngineOptions(dtype="bfloat16", num_blocks=32))
    calls["n"] = 0
    out = engine.generate_sync([GenerationRequest("r", ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))])
    assert len(out["r"]) == 4 and calls["n"] == 4 * config.num_layers * 4  # a prefill and three decodes


def test_hf_state_dict_dequantizes_fp8_weights() -> None:
    config, weights = tiny_weights()
    quantize_model(weights)
    sd = hf_state_dict(config, weights)
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and q.shape == (config.num_heads * config.head_dim, config.hidden_size)
    torch.testing.assert_close(sd["model.layers.1.mlp.down_proj.weight"], weights.layers[1].down.dequantize(torch.bfloat16))


# -- refusals ------------------------------------------------------------------------------------


def test_fp8_options_are_checked_at_config_load() -> None:
    assert EngineOptions.from_dict({"quantization": "fp8", "device": "cuda"}).quantization == "fp8"
    assert EngineOptions.from_dict({"quantization": "fp8", "device": "auto", "dtype": "bf16"}).quantization == "fp8"
    assert EngineOptions().quantization is None
    with pytest.raises(ValueError, match="paged backend option quantization: fp8 runs on CUDA GPUs .* not on device cpu"):
        EngineOptions.from_dict({"quantization": "fp8"})  # the default device is the CPU
    with pytest.raises(ValueError, match="paged backend option quantization: fp8 computes .* dtype float32"):
        EngineOptions.from_dict({"quantization": "fp8", "device": "cuda", "dtype": "float32"})
    with pytest.raises(ValueError, match="paged backend option quantization: Input should be 'fp8'"):
        EngineOptions.from_dict({"quantization": "int4", "device": "cuda"})


def test_a_policy_with_fp8_on_the_cpu_is_rejected_with_file_line_and_field() -> None:
    from gateway.registry import check_options
    from policies.schema import ConfigError, parse_config

    policy = "backends:\n  - name: node\n    kind: paged\n    model: dummy:tiny\n    options:\n      quantization: fp8\n"
    with pytest.raises(ConfigError, match=r"x.yaml:6: backends.0.options.quantization: fp8 runs on CUDA GPUs"):
        check_options(parse_config(policy, source="x.yaml"), policy, source="x.yaml")


def test_engine_start_refuses_fp8_where_device_auto_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="paged backend option quantization: fp8 needs a CUDA GPU .* device is cpu"):
        LLMEngine.from_model("dummy:tiny", device="auto", quantization="fp8")


def test_the_backend_reports_the_refusal_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.paged.backend import PagedBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend = PagedBackend(name="node", model="dummy:tiny", device="auto", quantization="fp8")  # valid options
    with pytest.raises(ValueError, match="quantization: fp8"):
        asyncio.run(backend.start())


def test_a_gpu_without_fp8_tensor_cores_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer.*A100-SXM4-80GB has 8.0"):
        fp8.check_fp8_support(torch.device("cuda"))


def test_a_torch_that_cannot_run_the_fp8_gemm_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capability alone is not enough (a torch build without row-wise FP8 GEMMs): one tiny
    GEMM is tried at start."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")

    def probe(device: torch.device) -> None:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(fp8, "_probe_fp8_gemm", probe)
    with pytest.raises(ValueError, match="cannot run row-wise FP8 GEMMs on NVIDIA H100: CUDA error: no kernel image is available"):
        fp8.check_fp8_support(torch.device("cuda"))
