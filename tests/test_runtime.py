"""Process settings from llmscratch.runtime that the trainer applies."""

import platform
import resource
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's (Linux); elsewhere the setting is a no-op")

# Allocate, touch and free a 64 MiB tensor 3 times, then 8 times more, and print the minor page faults of those 8.
# With the setting the heap keeps the freed block; a later aligned request can still miss it once and grow the
# heap (seen in about half the runs), after which a free block always fits.
_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "reuse":
        from llmscratch.runtime import keep_cpu_memory_for_reuse
        assert keep_cpu_memory_for_reuse()
    def round_():
        t = torch.empty(16 * 2**20)  # 64 MiB of fp32
        t.fill_(1.0)
        del t
    for _ in range(3):
        round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        round_()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _later_rounds_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc_only
def test_keep_cpu_memory_for_reuse_spares_the_page_faults_of_a_freed_large_tensor():
    pages = 8 * 64 * 2**20 // resource.getpagesize()
    assert _later_rounds_faults("default") > pages // 2  # glibc unmapped it: every page faults in again
    assert _later_rounds_faults("reuse") <= pages // 4  # kept in the heap: at most 2 of the 8 rounds fault
