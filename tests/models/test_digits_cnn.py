"""The digits CNN: a fixed stratified split of scikit-learn digits, deterministic one-thread training that
reaches >= 97% on the held-out test digits in < 30 s, the on-disk cache, and the bundled-model entry."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed"),
]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    from qgraph.models import digits_cnn

    monkeypatch.setenv("QGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(digits_cnn, "_STATES", {})
    return tmp_path


def test_split_is_stratified_fixed_and_disjoint_in_index():
    from qgraph.data.digits import calibration_batches, digits_split

    s = digits_split()
    assert s.x_train.shape == (1437, 1, 8, 8) and s.x_test.shape == (360, 1, 8, 8)
    counts = torch.bincount(s.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # 20% of each class (174..183 per class)
    assert float(s.x_train.min()) == -1.0 and float(s.x_train.max()) == 1.0
    again = digits_split()
    assert torch.equal(again.x_test, s.x_test) and torch.equal(again.y_train, s.y_train)
    # calibration images are training images, never test images (rows compared exactly)
    train_rows = {tuple(r.tolist()) for r in s.x_train.flatten(1)}
    cal = torch.cat(calibration_batches(4, batch_size=32))
    assert cal.shape == (128, 1, 8, 8)
    assert all(tuple(r.tolist()) in train_rows for r in cal.flatten(1))


def test_training_is_deterministic_and_leaves_caller_state_alone():
    from qgraph.models.digits_cnn import train_digits_cnn

    torch.manual_seed(123)
    threads = torch.get_num_threads()
    a = train_digits_cnn(epochs=1, cache=False)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    b = train_digits_cnn(epochs=1, cache=False)
    after_b = torch.rand(3)
    assert torch.equal(after_a, after_b)  # the caller's RNG stream is not consumed
    assert torch.get_num_threads() == threads
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train_digits_cnn(seed=1, epochs=1, cache=False)
    assert not torch.equal(c.state_dict()["head.weight"], sa["head.weight"])


@pytest.mark.slow
def test_bundled_model_trains_to_97_percent_in_under_30s_then_loads_from_cache(cache_dir):
    from qgraph.data.digits import digits_split
    from qgraph.models.digits_cnn import accuracy
    from qgraph.models.registry import get_bundled

    b = get_bundled("digits-cnn")
    assert b.available()
    start = time.process_time()  # CPU time: training runs on one thread, so this is its cost on an idle core
    model = b.load().module  # empty cache folder: trains with the default recipe
    seconds = time.process_time() - start
    s = digits_split()
    assert seconds < 30.0
    assert not model.training
    assert accuracy(model, s.x_test, s.y_test) >= 0.97
    assert accuracy(model, s.x_train, s.y_train) >= 0.99
    assert len(list(cache_dir.glob("digits-cnn-*.pt"))) == 1
    start = time.process_time()
    again = b.load().module
    assert time.process_time() - start < 1.0
    assert again is not model
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_disk_cache_round_trips_and_survives_a_broken_file(cache_dir):
    from qgraph.models import digits_cnn

    a = digits_cnn.train_digits_cnn(epochs=1)
    files = list(cache_dir.glob("digits-cnn-*.pt"))
    assert len(files) == 1
    digits_cnn._STATES.clear()
    b = digits_cnn.train_digits_cnn(epochs=1)  # from disk
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    b.head.weight.data.zero_()  # a fresh module per call: editing one never touches the cache
    assert not torch.equal(digits_cnn.train_digits_cnn(epochs=1).head.weight, b.head.weight)
    files[0].write_bytes(b"not a checkpoint")
    digits_cnn._STATES.clear()
    c = digits_cnn.train_digits_cnn(epochs=1)  # retrains, same weights
    assert torch.equal(c.state_dict()["head.weight"], a.state_dict()["head.weight"])


def test_bundled_entry_traces_and_w8a8_keeps_accuracy(cache_dir):
    import qgraph
    from qgraph.data.eval_sets import digits_set, evaluate, predict
    from qgraph.models import digits_cnn
    from qgraph.models.registry import LoadedModel, get_bundled

    small = digits_cnn.train_digits_cnn(epochs=2)  # keeps this test fast (90% test accuracy); full recipe above
    b = get_bundled("digits-cnn")
    loaded = LoadedModel("digits-cnn", small)
    (x,) = b.example_inputs(loaded)
    assert x.shape == (2, 1, 8, 8)
    calib = b.calibration_batches(loaded, 4)
    assert len(calib) == 4 and calib[0][0].shape == (32, 1, 8, 8)
    es = digits_set(quick=True)
    ref = predict(small, es.inputs)
    fp32 = evaluate(small, ref, es)
    q = qgraph.quantize(small, (x,), target="x86-avx2", calib=calib, progress=False,
                        pipeline="fold-bn,dce,fuse-activation,annotate{bits=8,act_bits=8},calibrate,"
                                 "quantize-weights,insert-fq")
    got = evaluate(q, ref, es)
    assert fp32["accuracy"] > 0.85 and fp32["agreement"] == 1.0 and fp32["kl"] < 1e-9
    assert got["agreement"] >= 0.98
    assert abs(got["accuracy"] - fp32["accuracy"]) <= 0.01
    assert got["kl"] < 0.01
