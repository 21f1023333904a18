"""The engine worker puts the C++ runtime in the global symbol scope and imports llama.cpp's
native libraries before numpy and pyzmq (a CUDA build died of SIGSEGV at model load otherwise:
backends/worker/preload.py). Checked on the real entry point: a llama.cpp worker started on a
model that does not exist, with `-X importtime`."""

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


# std::ostream::_M_insert<long>, the libstdc++ function the CUDA build's crash ran a copy of.
_OSTREAM_INSERT_LONG = "_ZNSo9_M_insertIlEERSoT_"


def global_scope_has_cxx_runtime(setup: str) -> bool:
    probe = f"import ctypes\n{setup}\nprint(hasattr(ctypes.CDLL(None), {_OSTREAM_INSERT_LONG!r}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_the_cxx_runtime_is_promoted_to_the_global_scope_after_pyzmq_loaded_it_privately() -> None:
    """pyzmq's libzmq loads libstdc++ into its own (local) scope, where llama.cpp's libraries
    do not bind to it; share_cxx_runtime makes that same runtime the one every later library
    binds to."""
    assert not global_scope_has_cxx_runtime("import zmq")
    assert global_scope_has_cxx_runtime("import zmq\nfrom backends.worker.preload import share_cxx_runtime\nassert share_cxx_runtime()")


def test_a_llamacpp_worker_preload_shares_the_cxx_runtime_and_a_paged_one_does_not() -> None:
    load = "from backends.worker.preload import load_engine_libraries\nload_engine_libraries({spec!r})"
    assert global_scope_has_cxx_runtime(load.format(spec='{"kind": "llamacpp"}'))
    assert not global_scope_has_cxx_runtime(load.format(spec='{"kind": "paged"}'))
