"""retain_host_memory: a freed large buffer is reused by the next allocation instead of being paged in again."""

import subprocess
import sys
import textwrap

import pytest

from jaxopt_serve.engine import host_memory

# Allocates and touches a 64 MiB buffer four times; prints the minor page faults of the last three rounds.
_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from jaxopt_serve.engine.host_memory import retain_host_memory
    if sys.argv[1] == "1":
        assert retain_host_memory()
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(16 << 20, np.float32)   # 64 MiB, above glibc's largest mmap threshold
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del a
    print(sum(faults[1:]))
""")


def _faults(retain: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if retain else "0"], capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")
def test_retained_memory_is_not_paged_in_again():
    huge_pages = (64 << 20) // (2 << 20)  # numpy asks for transparent huge pages: fewest faults per round
    default, retained = _faults(False), _faults(True)
    assert default >= 3 * huge_pages  # every round maps fresh pages (what is being fixed)
    assert retained * 10 < default  # the heap's pages are reused


def test_bad_pad_and_env_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="top_pad_bytes"):
        host_memory.retain_host_memory(top_pad_bytes=-1)
    monkeypatch.setenv(host_memory.ENV, "yes")
    with pytest.raises(ValueError, match="JAXOPT_SERVE_RETAIN_MEMORY must be 0 or 1, got 'yes'"):
        host_memory.retain_host_memory_from_env()
    monkeypatch.setenv(host_memory.ENV, "0")
    assert host_memory.retain_host_memory_from_env() is False
