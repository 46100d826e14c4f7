"""Memory stays flat over many inner loops (slow: `make test-all`)."""

import contextlib
import ctypes
import gc
import resource

import pytest

from seal.domains.knowledge import PROMPTS, training_texts
from seal.inner_loop import InnerLoop, InnerLoopConfig, KnowledgeJob


def _rss_mb() -> float:
    """Resident memory after a GC and, on glibc, handing free heap pages back to the OS, so
    that what is measured is memory still in use, not the allocator's free pools."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


@pytest.mark.slow
def test_rss_flat_over_1000_inner_loops(tiny, demo_eval):
    inner = InnerLoop(tiny, InnerLoopConfig(r=4, alpha=8, epochs=1, max_new_tokens=4, capacity=16))
    jobs = [
        KnowledgeJob(f"j{i}", [p], training_texts(p, [], PROMPTS["none"]), seed=i)
        for i, p in enumerate(demo_eval * 100)
    ][:1000]
    inner.run(jobs[:200])  # warm up allocator pools and caches
    before = _rss_mb()
    results = inner.run(jobs)
    after = _rss_mb()
    inner.close()
    assert len(results) == 1000
    assert after < before * 1.05, f"RSS grew from {before:.0f} MB to {after:.0f} MB"


def test_doctor_runs():
    from seal.doctor import checks

    rows = checks()
    assert any(what == "torch" and ok for what, ok, _ in rows)
