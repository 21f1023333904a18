"""The portable llama-cpp-python build (issue 12) and the CPU-variant loader that goes with it.

- the installed llama_cpp is the Makefile's portable build: one CPU module per x86 variant;
- statically (objdump): AMX tile instructions exist only in the AMX variant, only in its AMX
  functions, and the function every AMX path starts from asks the kernel for the tile state first;
- the loader never picks an AMX variant without the kernel's grant, and the variant it picks
  really runs a prompt here.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.llamacpp import cpu_variants as cv

REPO = Path(__file__).resolve().parents[2]
X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"
x86_linux_only = pytest.mark.skipif(not X86_LINUX, reason="x86-64 Linux only: its variant set, AMX, arch_prctl")

# Every AMX mnemonic objdump prints (AMX-TILE/INT8/BF16/FP16/COMPLEX), and any %tmm operand.
TILE_INSN = re.compile(r":\t(?:ldtilecfg|sttilecfg|tile[a-z0-9]+|tdp[a-z0-9]+|tcmm[a-z0-9]+)\b|%tmm\d")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")


@pytest.fixture(scope="module")
def lib_dir() -> Path:
    return cv.lib_dir()


@pytest.fixture(scope="module")
def variants(lib_dir: Path) -> dict[str, Path]:
    found = cv.cpu_variants(lib_dir)
    if not found:
        pytest.fail(f"{lib_dir} has no libggml-cpu-*.so: llama_cpp is a native build; run `make install`")
    return found


# -- the build -------------------------------------------------------------------------------


@x86_linux_only
def test_installed_llama_cpp_is_the_portable_build(lib_dir: Path, variants: dict[str, Path]) -> None:
    assert not (lib_dir / "libggml-cpu.so").exists(), "a monolithic (native) ggml-cpu is installed"
    # The floor, a mainstream AVX2 one and the AMX one of ggml's x86 list (GGML_CPU_ALL_VARIANTS).
    assert {"x64", "sse42", "haswell", "sapphirerapids"} <= set(variants)
    assert [name for name, path in variants.items() if cv.is_amx_variant(name, path)] == ["sapphirerapids"]
    assert cv.variant_score(variants["x64"]) > 0, "the floor variant runs on any x86-64"


# -- static proof: where the tile instructions are -------------------------------------------


@dataclass
class Disassembly:
    tiles: Counter[str] = field(default_factory=Counter)  # function -> AMX tile instructions in it
    amx_bodies: dict[str, list[str]] = field(default_factory=dict)  # functions named *amx*: their code


def disassemble(objdump: str, path: Path) -> Disassembly:
    """objdump -d -C of one library, streamed: tile instructions by function, AMX functions' code."""
    result = Disassembly()
    current = ""
    body: list[str] | None = None
    with subprocess.Popen([objdump, "-d", "-C", "--no-show-raw-insn", str(path)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            header = FUNCTION.match(line)
            if header:
                current = header.group(1)
                body = result.amx_bodies.setdefault(current, []) if "amx" in current.lower() else None
                continue
            if body is not None:
                body.append(line.rstrip())
            # (the cheap test first: millions of lines, few of which start a mnemonic with t)
            if (":\tt" in line or "tilecfg" in line or "%tmm" in line) and TILE_INSN.search(line):
                result.tiles[current] += 1
    assert proc.returncode == 0, f"objdump failed on {path}"
    return result


@pytest.fixture(scope="module")
def amx_libs(variants: dict[str, Path]) -> set[str]:
    """The AMX variants' file names (test_installed_llama_cpp_is_the_portable_build pins the set)."""
    return {path.name for name, path in variants.items() if cv.is_amx_variant(name, path)}


@pytest.fixture(scope="module")
def disassembly(lib_dir: Path) -> dict[str, Disassembly]:
    objdump = shutil.which("objdump")
    if not X86_LINUX or objdump is None:
        pytest.skip("needs Linux x86-64 and binutils' objdump")
    libs = sorted(lib_dir.glob("*.so"))  # the .so.N files are copies of these (wheels hold no links)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip((p.name for p in libs), pool.map(lambda p: disassemble(objdump, p), libs)))


def test_libraries_keep_their_symbols(disassembly: dict[str, Disassembly], amx_libs: set[str]) -> None:
    # The checks below go by function name; a stripped build keeps only the exported names.
    for lib in amx_libs:
        assert any("tinygemm_kernel_amx" in name for name in disassembly[lib].amx_bodies), (
            f"{lib} has no local symbols: built stripped (the Makefile sets SKBUILD_INSTALL_STRIP=false)"
        )


def test_tile_instructions_only_in_amx_functions_of_amx_variants(
    disassembly: dict[str, Disassembly], amx_libs: set[str]
) -> None:
    elsewhere = {lib: dict(d.tiles) for lib, d in disassembly.items() if d.tiles and lib not in amx_libs}
    assert not elsewhere, f"AMX tile instructions outside the AMX variants: {elsewhere}"
    assert amx_libs
    for lib in amx_libs:
        tiles = disassembly[lib].tiles
        assert sum(tiles.values()) > 100, f"{lib} has no AMX kernels: is the objdump scan broken?"
        outside = {fn: n for fn, n in tiles.items() if "amx" not in fn.lower()}
        assert not outside, f"{lib}: tile instructions in functions that are not AMX code: {outside}"


def test_amx_buffer_type_asks_the_kernel_first(disassembly: dict[str, Disassembly], amx_libs: set[str]) -> None:
    # Every tile instruction is reached through an AMX buffer, which only this function hands
    # out; ggml inlines ggml_amx_init() into it, or calls it (then look one call deep).
    for lib in amx_libs:
        bodies = disassembly[lib].amx_bodies
        code = bodies.get("ggml_backend_amx_buffer_type()")
        assert code, f"{lib}: no ggml_backend_amx_buffer_type() (stripped, or ggml renamed it)"
        for callee in {c for line in code for c in re.findall(r"call\s+\S+ <([^>+]+)>", line)}:
            code = code + bodies.get(callee, [])
        text = "\n".join(code)
        assert "$0x1023," in text, f"{lib}: no ARCH_REQ_XCOMP_PERM"
        assert "$0x12," in text, f"{lib}: no XFEATURE_XTILEDATA"
        assert "$0x9e," in text, f"{lib}: no SYS_arch_prctl"
        assert "<syscall@plt>" in text, f"{lib}: no syscall()"


# -- the loader ------------------------------------------------------------------------------


class FakeModule:
    """What the loader reads from a variant module: its score, maybe the AMX symbol."""

    def __init__(self, score: int, amx_symbol: bool) -> None:
        self.ggml_backend_score = lambda: score
        if amx_symbol:
            self.ggml_backend_amx_buffer_type = object()


@pytest.fixture
def fake_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A lib/ whose best-scoring variants are AMX ones: one by its symbol only (a name ggml may
    add one day), one by its name only (as if a future ggml stopped exporting the symbol)."""
    modules = {"x64": FakeModule(1, False), "haswell": FakeModule(63, False),
               "graniterapids": FakeModule(8000, True), "sapphirerapids": FakeModule(4000, False)}
    for name in modules:
        (tmp_path / f"libggml-cpu-{name}.so").touch()
    monkeypatch.setattr(cv, "_open", lambda path: modules[path.name[len("libggml-cpu-") : -len(".so")]])
    return cv.cpu_variants(tmp_path)


def test_amx_variants_are_never_chosen_by_themselves(fake_variants: dict[str, Path]) -> None:
    assert cv.choose_variant(fake_variants, amx_granted=False) == "haswell"
    assert cv.choose_variant(fake_variants, amx_granted=True) == "haswell"  # granted, still left out


def test_forced_variant(fake_variants: dict[str, Path]) -> None:
    assert cv.choose_variant(fake_variants, amx_granted=False, forced="x64") == "x64"
    assert cv.choose_variant(fake_variants, amx_granted=True, forced="graniterapids") == "graniterapids"
    with pytest.raises(RuntimeError, match="does not grant AMX"):
        cv.choose_variant(fake_variants, amx_granted=False, forced="sapphirerapids")
    with pytest.raises(RuntimeError, match="no such variant"):
        cv.choose_variant(fake_variants, amx_granted=True, forced="zen9")


def test_no_runnable_variant_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "libggml-cpu-haswell.so").touch()
    (tmp_path / "libggml-cpu-sapphirerapids.so").touch()
    monkeypatch.setattr(cv, "_open", lambda path: FakeModule(0 if "haswell" in path.name else 5000, "sapph" in path.name))
    with pytest.raises(RuntimeError, match="no llama.cpp CPU variant can run"):
        cv.choose_variant(cv.cpu_variants(tmp_path), amx_granted=False)


def test_load_cpu_backend_registers_once_and_never_amx_without_grant(
    fake_variants: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[str] = []
    monkeypatch.setattr(cv, "lib_dir", lambda: next(iter(fake_variants.values())).parent)
    monkeypatch.setattr(cv, "amx_tile_granted", lambda: False)
    monkeypatch.setattr(cv, "_register", lambda directory, module: registered.append(module.name) or True)
    monkeypatch.setattr(cv, "_loaded", None)
    monkeypatch.delenv(cv.VARIANT_ENV, raising=False)
    assert cv.load_cpu_backend() == "haswell"
    assert cv.load_cpu_backend() == "haswell"
    assert registered == ["libggml-cpu-haswell.so"]


def test_monolithic_build_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cv, "lib_dir", lambda: tmp_path)
    monkeypatch.setattr(cv, "_register", lambda directory, module: pytest.fail("registered on a monolithic build"))
    monkeypatch.setattr(cv, "_loaded", None)
    assert cv.load_cpu_backend() == "builtin"


@x86_linux_only
def test_real_amx_variant_is_only_run_when_named(variants: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # The installed modules, scored as on a CPU whose CPUID offers AMX (the issue-12 VM).
    real_score = cv.variant_score
    monkeypatch.setattr(cv, "variant_score", lambda path: 1 << 20 if "sapphirerapids" in path.name else real_score(path))
    for granted in (False, True):
        chosen = cv.choose_variant(variants, amx_granted=granted)
        assert chosen != "sapphirerapids" and real_score(variants[chosen]) > 0
    assert cv.choose_variant(variants, amx_granted=True, forced="sapphirerapids") == "sapphirerapids"  # the control


@x86_linux_only
def test_amx_grant_matches_the_cpu() -> None:
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    if "amx_tile" not in flags:
        assert not cv.amx_tile_granted()
    else:  # the CPU has it: the kernel may still refuse (the issue-12 VM); either way, no crash
        assert isinstance(cv.amx_tile_granted(), bool)


# -- the chosen variant runs a real prompt ---------------------------------------------------

# In a subprocess: a registered backend cannot be unregistered, and must not leak into other tests.
RUN_PROMPT = r"""
import ctypes, json, sys
from backends.llamacpp import cpu_variants
variant = cpu_variants.load_cpu_backend()  # before the first Llama
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm("The capital of France is", max_tokens=8, temperature=0.0)
ggml = ctypes.CDLL(str(cpu_variants.lib_dir() / "libllama.so"))  # llama.cpp's own registry
ggml.ggml_backend_reg_get.restype = ggml.ggml_backend_reg_name.restype = ctypes.c_void_p
ggml.ggml_backend_reg_get.argtypes = ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
regs = [ctypes.string_at(ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i))).decode()
        for i in range(ggml.ggml_backend_reg_count())]
print(json.dumps({"variant": variant, "text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"],
                  "regs": regs, "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def run_prompt(model_path: Path, forced: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop(cv.VARIANT_ENV, None)
    if forced:
        env[cv.VARIANT_ENV] = forced
    proc = subprocess.run([sys.executable, "-c", RUN_PROMPT, str(model_path)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"the prompt run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@x86_linux_only
@pytest.mark.slow
def test_chosen_variant_runs_a_prompt(variants: dict[str, Path], model_path: Path) -> None:
    expected = cv.choose_variant(variants, cv.amx_tile_granted())
    auto = run_prompt(model_path)
    assert auto["variant"] == expected
    assert auto["tokens"] == 8 and auto["text"].strip()
    assert auto["regs"] == ["CPU"], "llama.cpp's registry should hold exactly the variant registered"
    # The features llama.cpp reports are the loaded module's: the floor variant has no AVX at all.
    floor = run_prompt(model_path, forced="x64")
    assert floor["variant"] == "x64" and floor["tokens"] == 8
    assert "AVX = 1" not in floor["system_info"]
    if expected not in ("x64", "sse42"):
        assert "AVX = 1" in auto["system_info"], auto["system_info"]
    if not cv.amx_tile_granted():
        assert "AMX_INT8 = 1" not in auto["system_info"]
