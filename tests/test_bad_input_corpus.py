"""A deterministic corpus of bad inputs: every case ends in a typed qgraph error (or a clean one-line CLI exit),
or, where the mutation left the input valid, in a result identical to the untouched one. Never a raw
exception, a silent load of tampered data, or code execution.

Cases are generated from fixed seeds (``random.Random``), so the corpus is the same on every run. Counts per
category are printed with ``-s`` and asserted to add up to at least 1,000.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qgraph
from qgraph.artifact import load_artifact, save_artifact
from qgraph.cli import main
from qgraph.errors import QGraphError

COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    q = qgraph.quantize(model, (x,), target="x86-avx2", progress=False,
                        pipeline=qgraph.api.lowering_pipeline("scheme=bcq,bits=3,group_size=32"))
    folder = save_artifact(q, tmp_path_factory.mktemp("corpus") / "model")
    return folder, x, q(x)


def _mutate_value(rng: random.Random, v):
    choices = [None, [], {}, "", "evil", -1, 0, 10**30, 1.5, True, [1, 2], {"kind": "evil"}, "nan", "../x", "\u0000"]
    if isinstance(v, str) and rng.random() < 0.3:
        return v[: rng.randrange(len(v) + 1)] + rng.choice(["", "x", "}", "\\"])
    return copy.deepcopy(rng.choice(choices))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutated_manifests(manifest: dict, n: int, seed: int):
    rng = random.Random(seed)
    paths = [p for p in _paths(manifest) if p]
    for _ in range(n):
        m = copy.deepcopy(manifest)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            try:
                parent = m
                for k in path[:-1]:
                    parent = parent[k]
                if rng.random() < 0.35 and isinstance(parent, dict):
                    parent.pop(path[-1], None)
                else:
                    parent[path[-1]] = _mutate_value(rng, parent[path[-1]])
            except (KeyError, IndexError, TypeError):
                continue
        yield m


INFORMATIONAL = ("versions", "source", "target_source", "program_note", "qualname", "bcq_rounds", "model_fingerprint")


def _meaning(m) -> str:
    """The manifest less its informational fields (labels, versions, how a weight was optimized)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in INFORMATIONAL}
        return [strip(v) for v in o] if isinstance(o, list) else o
    return json.dumps(strip(m), sort_keys=True)


def _check_load(folder: Path, x, expect, original=None) -> str:
    try:
        y = load_artifact(folder)(x)
    except QGraphError:
        return "refused"
    assert torch.equal(y, expect), f"{folder}: tampered artifact loaded with different outputs"
    if original is not None:
        now = json.loads((folder / "manifest.json").read_text())
        assert _meaning(now) == _meaning(original), f"{folder}: a manifest that changed meaning was loaded"
    return "same"


def test_tampered_manifests(artifact, tmp_path):
    folder, x, expect = artifact
    manifest = json.loads((folder / "manifest.json").read_text())
    outcomes = {"refused": 0, "same": 0}
    dest = tmp_path / "m"
    shutil.copytree(folder, dest)
    for i, m in enumerate(_mutated_manifests(manifest, 300, seed=1)):
        text = json.dumps(m) if i % 10 else json.dumps(m)[: (i * 7919) % max(1, len(json.dumps(m)))]
        (dest / "manifest.json").write_text(text)
        outcomes[_check_load(dest, x, expect, manifest)] += 1
    COUNTS["tampered manifests"] = sum(outcomes.values())
    assert outcomes["refused"] >= 200, outcomes


def test_tampered_binary_files(artifact, tmp_path):
    folder, x, expect = artifact
    rng = random.Random(2)
    names = ["weights.safetensors", "program.safetensors", "program.json"]
    n = 0
    for i in range(240):
        dest = tmp_path / f"b{i}"
        shutil.copytree(folder, dest)
        name = names[i % 3]
        data = bytearray((dest / name).read_bytes())
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data = data[: rng.randrange(len(data))]
        elif kind == 2:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            start = rng.randrange(len(data))
            data[start:start + 64] = bytes(min(64, len(data) - start))
        if bytes(data) == (folder / name).read_bytes():
            data += b"\0"
        (dest / name).write_bytes(bytes(data))
        with pytest.raises(QGraphError, match="sha256|cannot be read|missing"):
            load_artifact(dest)
        shutil.rmtree(dest)
        n += 1
    COUNTS["tampered safetensors/program files"] = n


def test_malformed_target_tomls(tmp_path):
    base = (Path(qgraph.__file__).parent.parent / "targets" / "x86-avx2.toml")
    if not base.exists():
        import importlib.resources

        base = Path(str(importlib.resources.files("qgraph.targets") / "x86-avx2.toml"))
    lines = base.read_text().splitlines()
    rng = random.Random(3)
    bad_values = ["nan", "inf", "-inf", "-1", "0", "-1e9", '"x"', "[0, -1]", "[]", "{}", "true", "1e400", '"\\u0000"']
    n = refused = 0
    for i in range(220):
        out = list(lines)
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(len(out))
            if "=" in out[j] and rng.random() < 0.8:
                key = out[j].split("=", 1)[0]
                out[j] = f"{key}= {rng.choice(bad_values)}"
            elif rng.random() < 0.5:
                out.pop(j)
            else:
                out[j] = out[j][: rng.randrange(len(out[j]) + 1)]
        p = tmp_path / f"t{i}.toml"
        p.write_text("\n".join(out) if i % 17 else "\n".join(out)[: rng.randrange(200)])
        try:
            t = qgraph.load_target(str(p))
        except QGraphError:
            refused += 1
        else:  # what loads must be a sane target
            assert all(v > 0 and v < float("inf") for v in t.cost.macs_per_second.values())
            assert 0 < t.cost.memory_bandwidth_gbps < float("inf")
        n += 1
    COUNTS["target TOMLs"] = n
    assert refused >= 150


def test_pipeline_texts():
    from qgraph.pass_manager import PassManager
    from qgraph.registry import registered_passes

    names = sorted(registered_passes())
    rng = random.Random(4)
    junk = ["{", "}", ",", "=", "{{", "==", " ", "\n", "\u00e9", "-1", "1e999", "nan", "x" * 300]
    values = ["-1", "0", "2", "99", "1e9", "nan", "inf", "true", "maybe", "", "bcq", "3.5", "-0.5"]
    n = 0
    for i in range(220):
        parts = []
        for _ in range(rng.randint(1, 4)):
            name = rng.choice(names) if rng.random() < 0.85 else rng.choice(["quantise", "", "fold_bn", "x{"])
            if rng.random() < 0.6:
                opt = rng.choice(["bits", "scheme", "group_size", "alpha", "evals", "merge", "method", "p", "nope"])
                name += "{" + f"{opt}={rng.choice(values)}" + "}"
            parts.append(name)
        text = ",".join(parts)
        if i % 5 == 0:
            pos = rng.randrange(len(text) + 1)
            text = text[:pos] + rng.choice(junk) + text[pos:]
        try:
            PassManager(text)
        except QGraphError:
            pass
        n += 1
    COUNTS["pipeline texts"] = n


def test_cli_argument_sets(capsys, tmp_path):
    rng = random.Random(5)
    flags = {
        "lower": ["--bits", "--group-size", "--act-bits", "--scheme", "--method", "--target", "--calib", "--pipeline",
                  "--config", "--out"],
        "search": ["--avg-bits", "--max-bytes", "--max-latency", "--trials", "--workers", "--eval-size",
                   "--group-sizes", "--hutchinson-iters", "--driver", "--threads", "--cache"],
        "targets": [], "export": ["--out", "--model"], "inspect": ["--pipeline", "--target"],
    }
    values = ["-1", "0", "nan", "inf", "1e999", "abc", "3", "bcq", "x86-avx3", "/dev/null", "no/such.pt", "{",
              "30%", "25MB", "lots", "", "-5,0", "1000000000000"]
    models = ["no/such.py:make", "nope", str(tmp_path / "x.onnx"), str(tmp_path), "model.py"]
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    n = 0
    for _ in range(160):
        cmd = rng.choice(sorted(flags))
        if cmd == "targets":
            argv = ["targets", rng.choice(["list", "show", "validate", "frob"]), rng.choice(["x86-avx2", "nope",
                                                                                              str(tmp_path / "t.toml")])]
        else:
            argv = [cmd, rng.choice(models)]
            for _ in range(rng.randint(0, 4)):
                argv += [rng.choice(flags[cmd]), rng.choice(values)]
            if cmd == "export" and "--out" not in argv:
                argv += ["--out", str(tmp_path / "o.onnx")]
        code = main(argv + (["--quiet"] if cmd in ("lower", "search") else []))
        err = capsys.readouterr().err
        assert code in (0, 2, 3), (argv, code, err)
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        if code:
            assert sum(ln.startswith(("qgraph: error", "usage:")) for ln in err.splitlines()) >= 1, (argv, err)
        n += 1
    COUNTS["CLI argument sets"] = n


def _tiny_onnx() -> bytes:
    rng = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(16, 8, generator=rng).numpy(), torch.randn(4, 16, generator=rng).numpy()
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_truncated_and_mutated_onnx():
    from qgraph.ir.onnx import load_onnx

    data = _tiny_onnx()
    load_onnx(data)  # the untouched model loads
    rng = random.Random(6)
    n = 0
    for i in range(120):
        b = bytearray(data)
        if i % 2:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            g = load_onnx(bytes(b))
        except QGraphError:
            pass
        else:
            try:
                onnx.checker.check_model(onnx.load_from_string(bytes(b)))
            except Exception:  # noqa: BLE001
                pytest.fail(f"case {i}: a model onnx.checker rejects was loaded")
            assert g is not None
        n += 1
    COUNTS["truncated/mutated ONNX"] = n


def test_corpus_is_at_least_1000_cases():
    expected = {"tampered manifests", "tampered safetensors/program files", "target TOMLs", "pipeline texts",
                "CLI argument sets", "truncated/mutated ONNX"}
    if set(COUNTS) != expected:
        pytest.skip("run the whole module to count the corpus")
    print("\nbad-input corpus:", json.dumps(COUNTS), "total", sum(COUNTS.values()))
    assert sum(COUNTS.values()) >= 1000
