"""The llama.cpp-vs-paged GPU benchmark's plumbing (gateway/bench/peer_gpu.py, peer_prepare.py):
the policy it serves is valid, time is shared out within the budget, and the slimmed
llama-cpp-python source keeps what its CUDA build compiles."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from gateway.bench import peer_gpu, peer_prepare
from policies.schema import Config


def _args(**overrides: object) -> argparse.Namespace:
    values = dict(
        device="cuda", llamacpp_instances=1, llamacpp_max_queue=512, llamacpp_n_ctx=4096, llamacpp_n_batch=512,
        llamacpp_n_gpu_layers=-1, llamacpp_threads=None, paged_max_num_seqs=256, paged_max_num_batched_tokens=8192,
        paged_max_model_len=4096, paged_gpu_memory_utilization=0.9, paged_kv_cache_gib=0.25, paged_threads=None,
        max_tokens=256, temperature=0.7, ignore_eos=True,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_each_server_policy_validates_and_never_times_out_a_queued_request(device: str) -> None:
    configs = peer_gpu.backend_configs(_args(device=device), Path("/models/m.gguf"))
    assert list(configs) == ["llamacpp", "paged"]  # the runner starts first
    assert configs["llamacpp"]["options"]["n_gpu_layers"] == (-1 if device == "cuda" else 0)
    for backend in configs.values():
        config = Config.model_validate(peer_gpu.server_config(backend))
        assert config.server.host == "127.0.0.1"
        route = config.routes[0]
        assert route.model == peer_gpu.MODEL and route.retries.max_retries == 0
        assert route.timeouts.first_token_s >= 3600  # a request may wait minutes in the runner's queue
        assert config.aliases()[peer_gpu.MODEL] == [backend["name"]]


def test_request_body_is_a_bench_llm_style_chat() -> None:
    import json

    body = json.loads(peer_gpu.request_body(9, _args()))
    assert body["messages"] == [{"role": "user", "content": peer_gpu.PROMPTS[9 % len(peer_gpu.PROMPTS)]}]
    assert (body["max_tokens"], body["temperature"], body["ignore_eos"]) == (256, 0.7, True)
    assert "stream" not in body
    assert "ignore_eos" not in json.loads(peer_gpu.request_body(0, _args(ignore_eos=False)))


def test_wave_share_gives_the_queueing_backend_the_time_left() -> None:
    left = {"paged": 2, "llamacpp": 2}
    # Two runner waves left and two paged ones: each paged wave is planned at the minimum.
    assert peer_gpu.wave_share(300.0, "llamacpp", left) == pytest.approx((300 - 2 * peer_gpu.MIN_WAVE_S) / 2)
    assert peer_gpu.wave_share(5.0, "llamacpp", left) == peer_gpu.MIN_WAVE_S  # never below the minimum
    assert peer_gpu.wave_share(100.0, "paged", {"paged": 1}) == 100.0


def test_descendants_include_the_process_and_its_children() -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = peer_gpu.descendants(os.getpid())
        assert os.getpid() in found and child.pid in found
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("member", "needed"),
    [
        ("llama_cpp_python-0.3.36/CMakeLists.txt", True),
        ("llama_cpp_python-0.3.36/llama_cpp/llama.py", True),
        ("llama_cpp_python-0.3.36/.git/HEAD", False),
        ("llama_cpp_python-0.3.36/docs/index.md", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/tools/mtmd/mtmd.cpp", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/common/common.cpp", True),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/vendor/nlohmann/json.hpp", True),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu", True),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp", True),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-backend.cpp", True),
    ],
)
def test_the_slimmed_sdist_keeps_what_the_cuda_build_reads(member: str, needed: bool) -> None:
    assert peer_prepare.kept(member) is needed


def test_wheels_of_one_package_in_two_folders_are_found(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "typing_extensions-4.16.0-py3-none-any.whl").touch()
    (b / "typing-extensions-4.15.0-py3-none-any.whl").touch()
    (b / "fastapi-0.165.0-py3-none-any.whl").touch()
    assert len(peer_prepare.duplicates(a, b)) == 1
    assert peer_prepare.duplicates(b) == []


def test_a_runner_that_did_not_offload_is_reported() -> None:
    run = peer_gpu.Run(settings={}, machine={})
    gguf = 16 * 2**30
    run.startup["llamacpp"] = {"gpu_mib_before": 500, "gpu_mib_after_warmup": 900, "gpu_mib_process_after_warmup": None}
    assert "not offloaded" in (peer_gpu.offload_check("llamacpp", run, gguf, _args()) or "")
    run.startup["llamacpp"]["gpu_mib_process_after_warmup"] = 17_000
    assert peer_gpu.offload_check("llamacpp", run, gguf, _args()) is None
    assert peer_gpu.offload_check("llamacpp", run, gguf, _args(device="cpu")) is None


def test_gpu_memory_is_read_per_process_tree_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a stand-in nvidia-smi that answers the two queries the benchmark asks."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --query-gpu=memory.used) echo 1234 ;;\n"
        f'  --query-compute-apps=pid,used_memory) printf "{os.getpid()}, 500\\n4194301, 7\\n" ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert peer_gpu.gpu_used_mib() == 1234
    assert peer_gpu.process_mib() == {os.getpid(): 500, 4194301: 7}
    with peer_gpu.MemorySampler(os.getpid(), period_s=0.05) as sampler:
        pass
    assert (sampler.peak_total, sampler.peak_process) == (1234, 500)  # the other process is not ours
