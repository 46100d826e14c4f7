import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Tests are CPU-only and small: keep them deterministic and off the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random model, loaded once per test session (tests must leave it unwrapped)."""
    from seal.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def demo_eval():
    from seal.domains.knowledge import load_passages

    return load_passages("demo:eval")


# --------------------------------------------------------------------------------------------
# Property-based tests: one shared hypothesis profile, and a measured case count.
#
# "ci" (the default) is reproducible: derandomize gives every test the same examples on every
# run and machine, and no example database is read or written. HYPOTHESIS_PROFILE=dev draws
# fresh random examples instead (useful locally to hunt for new failures).

_COMMON = dict(
    deadline=None,  # CI machines vary; a slow example is not a failure
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_hypothesis_cases: dict[str, int] = {}


def _counting(name: str, inner):
    @functools.wraps(inner)
    def counted(*args, **kwargs):
        _hypothesis_cases[name] = _hypothesis_cases.get(name, 0) + 1
        return inner(*args, **kwargs)

    counted._seal_counted = True
    return counted


def pytest_collection_modifyitems(items):
    # Hypothesis documents `test.hypothesis.inner_test` as replaceable: wrap it to count the
    # examples each property test actually runs (parametrized items share one function).
    for item in items:
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        inner = getattr(handle, "inner_test", None)
        if inner is not None and not getattr(inner, "_seal_counted", False):
            handle.inner_test = _counting(item.nodeid.split("[")[0], inner)


_bad_inputs: list[str] = []


@pytest.fixture
def bad_input():
    """Call with the name of each bad input a test tries (test_bad_input.py): the session
    summary reports how many were tried."""
    return _bad_inputs.append


def pytest_terminal_summary(terminalreporter):
    if _hypothesis_cases:
        total = sum(_hypothesis_cases.values())
        terminalreporter.write_line(
            f"hypothesis: {total:,} cases in {len(_hypothesis_cases)} property tests"
        )
        if terminalreporter.config.option.verbose > 0:
            for name, n in sorted(_hypothesis_cases.items(), key=lambda kv: -kv[1]):
                terminalreporter.write_line(f"  {n:6,}  {name}")
    if _bad_inputs:
        terminalreporter.write_line(f"bad-input sweep: {len(_bad_inputs)} inputs tried")
