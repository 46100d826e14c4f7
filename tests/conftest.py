import os

import pytest
import torch

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
