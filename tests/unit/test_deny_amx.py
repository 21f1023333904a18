"""gateway.bench.deny_amx: under its seccomp filter the AMX grant fails with EPERM, for the
command and its children, and other system calls (other arch_prctl options too) still work;
the llama.cpp runner then picks a variant without AMX and generates."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="Linux x86-64 only")

PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(option, arg):
    rc = libc.syscall(ctypes.c_long(158), ctypes.c_long(option), ctypes.c_long(arg))
    return 0 if rc == 0 else ctypes.get_errno()
# ARCH_REQ_XCOMP_PERM for XTILEDATA; ARCH_GET_XCOMP_SUPP (a read) must still work.
supp = ctypes.c_uint64()
rc = libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1021), ctypes.byref(supp))
print(call(0x1023, 18), rc, flush=True)
if os.fork() == 0:
    print(call(0x1023, 18), flush=True)
    os._exit(0)
os.wait()
"""


def run(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.split("\n")


def test_the_grant_is_refused_with_eperm_in_the_command_and_its_children() -> None:
    plain = run("-c", PROBE)
    denied = run("-m", "gateway.bench.deny_amx", "--", sys.executable, "-c", PROBE)
    assert denied[0].split() == ["1", "0"]  # EPERM for the grant; the read allowed
    assert denied[1] == "1"  # a forked child is filtered too
    assert plain[0].split()[0] != "1"  # without the filter: granted (0), or EINVAL where no AMX


def test_the_runner_picks_a_variant_without_amx_under_the_filter() -> None:
    code = "from backends.llamacpp.cpu_variants import amx_tile_granted, load_cpu_backend; print(amx_tile_granted(), load_cpu_backend())"
    granted, variant = run("-m", "gateway.bench.deny_amx", sys.executable, "-c", code)[0].split()
    assert granted == "False" and variant != "sapphirerapids"
