"""Process settings from llmscratch.runtime that the trainer applies."""

import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's (Linux); elsewhere the setting is a no-op")

# Allocate and touch a 64 MiB tensor, then free it; print glibc's mallinfo2 counts of bytes in mmapped blocks
# while it lives and of free bytes the heap kept after it was freed.
_PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    if sys.argv[1] == "reuse":
        from llmscratch.runtime import keep_cpu_memory_for_reuse
        assert keep_cpu_memory_for_reuse()
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    t = torch.empty(16 * 2**20)  # 64 MiB of fp32
    t.fill_(1.0)
    mmapped = libc.mallinfo2().hblkhd
    del t
    print(mmapped, libc.mallinfo2().fordblks)
""")
MIB64 = 64 * 2**20


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    mmapped, kept = out.stdout.split()
    return int(mmapped), int(kept)


@glibc_only
def test_keep_cpu_memory_for_reuse_keeps_a_freed_large_tensor_in_the_heap():
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    mmapped, kept = _probe("default")
    assert mmapped >= MIB64 and kept < MIB64  # glibc's default: mapped for the tensor, unmapped on free
    mmapped, kept = _probe("reuse")
    assert mmapped < MIB64 and kept >= MIB64  # from the heap, and still there for the next step
