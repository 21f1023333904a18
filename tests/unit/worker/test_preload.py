"""The engine worker imports llama.cpp's native libraries before numpy and pyzmq (a CUDA build
died of SIGSEGV at model load otherwise: backends/worker/preload.py). Checked on the real entry
point: a llama.cpp worker started on a model that does not exist, with `-X importtime`."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def import_order(kind: str, tmp_path) -> list[str]:  # type: ignore[no-untyped-def]
    spec = json.dumps({"kind": kind, "name": "t", "model": str(tmp_path / "missing.gguf"), "model_id": "t"})
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "backends.worker", spec, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/owner"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1  # the model cannot load: the worker says so and exits
    return [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]


def test_a_llamacpp_worker_loads_llama_cpp_before_numpy_and_zmq(tmp_path) -> None:  # type: ignore[no-untyped-def]
    order = import_order("llamacpp", tmp_path)
    first = {name: order.index(name) for name in ("llama_cpp.llama_cpp", "numpy", "zmq") if name in order}
    assert first["llama_cpp.llama_cpp"] < first["numpy"] and first["llama_cpp.llama_cpp"] < first["zmq"], first


def test_a_paged_worker_does_not_import_llama_cpp(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert "llama_cpp" not in import_order("paged", tmp_path)


def test_a_native_crash_reports_its_stack_even_with_stderr_silenced() -> None:
    """llama.cpp's quiet model load points fd 2 at /dev/null; a crash then must still name
    where it happened in the gateway's log (the worker's inherited stderr)."""
    crash = (
        "import ctypes, os\n"
        "from backends.worker.preload import keep_crash_reports\n"
        "keep_crash_reports()\n"
        "os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # as llama_cpp's suppress_stdout_stderr does\n"
        "def load_model():\n"
        "    ctypes.string_at(0)  # SIGSEGV\n"
        "load_model()\n"
    )
    done = subprocess.run([sys.executable, "-c", crash], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -11
    assert "Segmentation fault" in done.stderr and "load_model" in done.stderr, done.stderr
