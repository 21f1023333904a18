"""Register llama.cpp's CPU backend: the best variant this machine *and its kernel* can run.

turnout builds llama-cpp-python portably (see the Makefile): instead of one `libggml-cpu.so`
compiled with -march=native, `llama_cpp/lib` holds one module per x86 micro-architecture
(`libggml-cpu-x64.so` ... `libggml-cpu-haswell.so` ... `libggml-cpu-sapphirerapids.so`). Nothing
loads them by itself: `llama_backend_init()` calls `ggml_backend_load_all()` only while no backend
is registered, and its search paths (the executable's directory, the working directory) miss
`llama_cpp/lib`. So this module picks one and registers it, once per process, before the first
`llama_cpp.Llama`.

Why not let ggml choose: it ranks variants by CPUID alone (each module's `ggml_backend_score()`).
AMX also needs the kernel to grant this process the tile state (arch_prctl), and a VM can
advertise AMX without granting it: issue 12 died of SIGILL at `tileloadd`. And where the grant
succeeds, ggml's AMX kernels still died of SIGILL at `tilezero` on an Intel Xeon (Sapphire Rapids
class) VM, in the threads that run them (the tile configuration they load first is per thread;
llama.cpp PR 26954 describes the bug). So the best non-AMX variant is chosen (icelake's
AVX-512 VNNI there); an AMX variant runs only when named in TURNOUT_GGML_CPU_VARIANT, and even
then only after the grant succeeded in this process, so no tile instruction is mapped in
otherwise. The grant is per process: call `load_cpu_backend()` in the process that runs the model.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import sys
import threading
from pathlib import Path

log = logging.getLogger("turnout.llamacpp")

#: Forces a variant by name ("haswell", "x64", ...): for benchmarks, for working around a bad
#: pick, and the only way to run an AMX variant. It must exist, score > 0 on this CPU, and, for an
#: AMX variant, have the AMX grant.
VARIANT_ENV = "TURNOUT_GGML_CPU_VARIANT"

# ggml's AMX variants, by name, for the case where a future ggml stops exporting the AMX symbol
# below; the symbol is the primary test, so a new AMX variant name is caught without this list.
_AMX_NAMES = frozenset({"sapphirerapids"})
# Defined only in a module whose ggml-cpu was compiled with AMX (ggml/src/ggml-cpu/amx/ is
# compiled under __AMX_INT8__ && __AVX512VNNI__): every tile instruction sits behind it.
_AMX_SYMBOL = "ggml_backend_amx_buffer_type"

# Linux x86-64 ABI constants (asm/prctl.h, asm/unistd_64.h): what ggml's amx.cpp itself asks.
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

_PREFIX, _SUFFIX = "libggml-cpu-", ".so"  # ggml names its modules so on every OS but Windows

_lock = threading.Lock()
_loaded: str | None = None


def lib_dir() -> Path:
    """llama_cpp's shared-library directory, found without importing llama_cpp.

    `LLAMA_CPP_LIB_PATH` overrides it, as it does for llama_cpp's own loader.
    """
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama_cpp (llama-cpp-python) is not installed; run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def cpu_variants(directory: Path) -> dict[str, Path]:
    """The CPU variant modules in `directory`, by name: {"haswell": .../libggml-cpu-haswell.so}."""
    return {p.name[len(_PREFIX) : -len(_SUFFIX)]: p for p in sorted(directory.glob(f"{_PREFIX}*{_SUFFIX}"))}


def amx_tile_granted() -> bool:
    """Whether the kernel grants this process AMX tile data (asking for it, as ggml does).

    `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` returns 0 only when the CPU has AMX,
    the kernel supports it (5.16+) and lets this process use it; anything else, and every
    platform but Linux x86-64, is a no.
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                      ctypes.c_long(_XFEATURE_XTILEDATA))
    return rc == 0


def _libllama(directory: Path) -> ctypes.CDLL:
    """llama_cpp's libllama, and with it the libggml and libggml-base it links.

    The process keeps one copy per path, so this is the very library llama_cpp loads.
    """
    path = next((p for p in (directory / "libllama.so", directory / "libllama.dylib") if p.exists()), None)
    if path is None:
        raise RuntimeError(f"no libllama in {directory}")
    return ctypes.CDLL(str(path))


def _open(path: Path) -> ctypes.CDLL:
    # A variant module needs libggml-base but has no RUNPATH: ggml opens it from a process that
    # has libggml (and so libggml-base) loaded already, and so do we. dlopen runs no variant
    # code but static constructors, which ggml's own loader relies on being safe on any CPU;
    # ctypes never closes it, which costs mappings only.
    _libllama(path.parent)
    return ctypes.CDLL(str(path))


def variant_score(path: Path) -> int:
    """The module's own `ggml_backend_score()`: 0 when this CPU lacks an instruction set it needs.

    The score function is compiled without the variant's ISA flags, so it runs on any CPU.
    """
    score = _open(path).ggml_backend_score
    score.restype = ctypes.c_int
    return int(score())


def is_amx_variant(name: str, path: Path) -> bool:
    """Whether the module contains AMX code: it defines ggml's AMX entry point (or has an AMX name)."""
    return name in _AMX_NAMES or "amx" in name or hasattr(_open(path), _AMX_SYMBOL)


def choose_variant(variants: dict[str, Path], amx_granted: bool, forced: str | None = None) -> str:
    """The variant to load: `forced` if allowed, else the best-scoring one without AMX code
    (see the module docstring) that this CPU can run."""
    scores = {name: variant_score(path) for name, path in variants.items()}
    amx = {name for name in variants if is_amx_variant(name, variants[name])}
    log.debug("ggml CPU variants: scores %s; AMX variants %s; AMX granted: %s", scores, sorted(amx), amx_granted)
    if forced:
        if forced not in variants:
            raise RuntimeError(f"{VARIANT_ENV}={forced!r}: no such variant; have {', '.join(variants)}")
        if scores[forced] <= 0 or (forced in amx and not amx_granted):
            why = "this CPU lacks its instructions" if scores[forced] <= 0 else "the kernel does not grant AMX"
            raise RuntimeError(f"{VARIANT_ENV}={forced!r} cannot run here: {why}")
        return forced
    allowed = {name: score for name, score in scores.items() if score > 0 and name not in amx}
    if not allowed:
        raise RuntimeError(f"no llama.cpp CPU variant can run on this CPU (scores {scores}, AMX ones left out: {sorted(amx)})")
    return max(allowed, key=lambda name: allowed[name])


def _register(directory: Path, module: Path) -> bool:
    """`ggml_backend_load(path)` in the libggml that libllama itself uses.

    Looked up through libllama's handle (dlsym searches its dependencies), not by opening
    lib/libggml.so: a wheel cannot hold symlinks, so libggml.so and the libggml.so.0 that
    libllama links are two copies of one file, and opening the other copy by path would load a
    second libggml with a backend registry of its own that llama.cpp never reads.
    """
    load = _libllama(directory).ggml_backend_load  # ggml_backend_reg_t (const char * path)
    load.argtypes = [ctypes.c_char_p]
    load.restype = ctypes.c_void_p
    return bool(load(os.fsencode(module)))


def _load() -> str:
    directory = lib_dir()
    variants = cpu_variants(directory)
    if not variants:  # a monolithic build: ggml-cpu is linked in and registers itself
        return "builtin"
    name = choose_variant(variants, amx_tile_granted(), os.environ.get(VARIANT_ENV) or None)
    # Other backend modules of a GGML_BACKEND_DL build (Metal, BLAS, CUDA where built) would have
    # come from ggml_backend_load_all(), which won't run now; each checks its own hardware, and
    # one that cannot load is no reason to refuse the CPU.
    for other in sorted(directory.glob(f"libggml-*{_SUFFIX}")):
        if not other.name.startswith((_PREFIX, "libggml-base")) and not _register(directory, other):
            log.warning("llama.cpp backend module %s did not load", other.name)
    if not _register(directory, variants[name]):
        raise RuntimeError(f"ggml_backend_load({variants[name]}) failed")
    return name


def load_cpu_backend() -> str:
    """Register the CPU variant for this process, once; returns its name ("haswell", ...).

    Returns "builtin" for a llama_cpp without variant modules (nothing to do). Raises
    RuntimeError when no variant can run here. Call it before the first `llama_cpp.Llama`.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
            log.info("llama.cpp CPU backend: %s", _loaded)
        return _loaded
