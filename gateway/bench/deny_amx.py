"""Run a command as on a VM whose kernel does not grant AMX, on any Linux x86-64 host.

    python -m gateway.bench.deny_amx -- python -c "from backends.llamacpp.cpu_variants import amx_tile_granted; print(amx_tile_granted())"

Issue 12's machine advertised AMX in CPUID but its kernel refused the tile state; there, any
tile instruction dies of SIGILL. A seccomp filter gives any host that refusal: it fails
`arch_prctl(ARCH_REQ_XCOMP_PERM, ...)`, the one request that grants AMX (Linux asks every
process to make it before its first tile instruction), with EPERM, and allows every other
system call. On an AMX host the command then sees what that VM's processes saw: AMX in CPUID,
no grant. The filter holds for the command and everything it starts.
"""

from __future__ import annotations

import ctypes
import os
import sys

from backends.llamacpp.cpu_variants import _ARCH_REQ_XCOMP_PERM, _SYS_ARCH_PRCTL

# linux/filter.h, linux/seccomp.h, linux/audit.h, linux/prctl.h
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_AUDIT_ARCH_X86_64 = 0xC000003E
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_EPERM = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
# offsets in struct seccomp_data: nr, arch, instruction_pointer, args[6]
_NR, _ARCH, _ARG0 = 0, 4, 16


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def program() -> list[tuple[int, int, int, int]]:
    """The BPF program: EPERM for arch_prctl(ARCH_REQ_XCOMP_PERM, ...), allow everything else.
    Each jump's false branch skips to the last instruction, ALLOW."""
    return [
        (_BPF_LD_W_ABS, 0, 0, _ARCH),
        (_BPF_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),
        (_BPF_LD_W_ABS, 0, 0, _NR),
        (_BPF_JEQ_K, 0, 3, _SYS_ARCH_PRCTL),
        (_BPF_LD_W_ABS, 0, 0, _ARG0),  # the low 32 bits of the first argument, the option
        (_BPF_JEQ_K, 0, 1, _ARCH_REQ_XCOMP_PERM),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EPERM),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]


def deny_amx_grant() -> None:
    """Install the filter in this process (and so in all it starts). Raises OSError."""
    code = program()
    filters = (_SockFilter * len(code))(*(_SockFilter(*ins) for ins in code))
    prog = _SockFprog(len(code), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    # No new privileges: what lets an unprivileged process install a filter at all.
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the seccomp filter failed: {os.strerror(err)}")


def main(argv: list[str]) -> int:
    """`python -m gateway.bench.deny_amx [--] COMMAND...`: exec COMMAND under the filter."""
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    deny_amx_grant()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
