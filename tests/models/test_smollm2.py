"""SmolLM2-135M from the GGUF package: loads once per process, and fp32 perplexity on one 512-token window
of an evaluation play lands where the measured baseline is (~17.6 on the first Hamlet window)."""

from __future__ import annotations

import pytest
import torch

from qgraph.errors import CalibrationError
from tests.conftest import SMOLLM2_MARKS

pytestmark = SMOLLM2_MARKS


@pytest.fixture(scope="module")
def lm():
    from qgraph.models.smollm2 import load_smollm2

    return load_smollm2()


def test_load_is_cached_fp32_llama(lm):
    from qgraph.models.smollm2 import load_smollm2

    model, _ = lm
    assert load_smollm2()[0] is model
    assert not model.training
    assert model.config.num_hidden_layers == 30
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_one_window_perplexity(lm):
    from qgraph.data.text import load_play
    from qgraph.models.smollm2 import CausalLMLogits, perplexity

    model, tokenizer = lm
    text = load_play("hamlet")
    ppl = perplexity(model, tokenizer, text, window=512, max_windows=1)
    assert 12.0 < ppl < 25.0
    # The logits-only wrapper (what gets traced) scores exactly the same (checked on a short window).
    short = perplexity(model, tokenizer, text, window=64, max_windows=1)
    assert perplexity(CausalLMLogits(model), tokenizer, text, window=64, max_windows=1) == pytest.approx(
        short, rel=1e-6
    )


def test_windows_are_fixed_and_non_overlapping(lm):
    from qgraph.models.smollm2 import token_windows

    _, tokenizer = lm
    text = " ".join(f"word{i}" for i in range(400))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    rows = token_windows(tokenizer, text, window=64)
    assert rows.shape == (ids.numel() // 64, 64)
    assert torch.equal(rows.flatten(), ids[: rows.numel()])
    with pytest.raises(CalibrationError, match="fewer than one"):
        token_windows(tokenizer, "too short", window=64)
