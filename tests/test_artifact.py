"""Artifacts load what they claim or refuse with an ArtifactError; they never run code from the folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qgraph
from qgraph import atomic
from qgraph.artifact import load_artifact, read_artifact, save_artifact
from qgraph.cli import EXIT_INPUT, EXIT_OK, main
from qgraph.errors import ArtifactError

FACTORY = '''
import torch, torch.nn as nn

def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return model, (torch.randn(4, 32),)
'''
PAYLOAD = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")

def make_model():
    pathlib.Path({marker!r}).write_text("ran")
    raise SystemExit(0)
'''


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), torch.randn(4, 32)


def _lowered(scheme: str = "scheme=bcq,bits=3,group_size=32", seed: int = 0):
    model, x = _model(seed)
    q = qgraph.quantize(model, (x,), target="x86-avx2", pipeline=qgraph.api.lowering_pipeline(scheme), progress=False)
    return model, x, q


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, x, q = _lowered()
    folder = save_artifact(q, tmp_path_factory.mktemp("a") / "model", source="net.py:make_model")
    return model, x, q, folder


def _copy(folder, dest):
    import shutil

    shutil.copytree(folder, dest)
    return dest


def _rehash(folder):
    """Recompute the manifest's hashes, as a careful tamperer would (so the content checks must catch it)."""
    import hashlib

    m = json.loads((folder / "manifest.json").read_text())
    for name in m["files"]:
        data = (folder / name).read_bytes()
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(m))


def test_artifact_runs_alone_bit_identical(saved):
    model, x, q, folder = saved
    again = load_artifact(folder)
    other = torch.randn(9, 32)
    assert torch.equal(again(x), q(x)) and torch.equal(again(other), q(other))
    replayed = load_artifact(folder, model, (x,))
    assert torch.equal(replayed(other), q(other))
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "program.json", "program.safetensors",
                                                         "weights.safetensors"]


def test_manifest_source_payload_never_runs(saved, tmp_path, monkeypatch, capsys):
    _, x, q, folder = saved
    shipped = tmp_path / "shipped"
    art = _copy(folder, shipped / "model")
    marker = tmp_path / "pwned"
    (shipped / "helper.py").write_text(PAYLOAD.format(marker=str(marker)))
    m = json.loads((art / "manifest.json").read_text())
    m["source"] = "helper.py:make_model"
    (art / "manifest.json").write_text(json.dumps(m))
    monkeypatch.chdir(shipped)
    code = main(["export", "model", "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT and "never imports or runs code" in err
    assert torch.equal(load_artifact("model")(x), q(x))
    assert not marker.exists() and not (tmp_path / "x.onnx").exists()


def test_export_with_a_different_model_is_refused(saved, tmp_path, capsys):
    _, _, _, folder = saved
    other = tmp_path / "tiny.py"
    other.write_text(FACTORY.replace("manual_seed(0)", "manual_seed(1)"))
    code = main(["export", str(folder), "--model", f"{other}:make_model", "--out", str(tmp_path / "x.onnx")])
    assert code == EXIT_INPUT and "other weights" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ArtifactError, match="other weights"):
        load_artifact(folder, _model(1)[0], (torch.randn(4, 32),))


def test_interrupted_overwrite_leaves_the_previous_artifact(saved, tmp_path, monkeypatch):
    _, x, q, folder = saved
    dest = _copy(folder, tmp_path / "model")
    _, _, q4 = _lowered("scheme=uniform,bits=4,group_size=32")

    def die(*a, **k):
        raise KeyboardInterrupt  # the process is stopped halfway through writing the new files

    monkeypatch.setattr("qgraph.program.save_program", die)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(q4, dest)
    monkeypatch.undo()
    assert torch.equal(load_artifact(dest)(x), q(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder or lock left


def test_crash_between_fallback_renames_still_loads(saved, tmp_path, monkeypatch):
    _, x, q, folder = saved
    dest = _copy(folder, tmp_path / "model")
    _, _, q4 = _lowered("scheme=uniform,bits=4,group_size=32")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the old folder went aside, before the new one is in place
        real_rename(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(q4, dest)
    monkeypatch.undo()
    assert not dest.exists() and torch.equal(load_artifact(dest)(x), q(x))  # read from the aside copy
    save_artifact(q4, dest)
    assert torch.equal(load_artifact(dest)(x), q4(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_rewrite_leaves_no_stale_files_and_a_second_writer_fails(saved, tmp_path):
    _, x, q, folder = saved
    dest = _copy(folder, tmp_path / "model")
    (dest / "stale.bin").write_bytes(b"old")
    save_artifact(q, dest)
    assert not (dest / "stale.bin").exists()
    inside, release = threading.Event(), threading.Event()

    def hold():
        import shutil

        with atomic.atomic_folder(dest) as tmp:
            shutil.copytree(dest, tmp, dirs_exist_ok=True)
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(10)
    try:
        with pytest.raises(atomic.WriteError, match="another process is writing"):
            save_artifact(q, dest)
    finally:
        release.set()
        t.join()
    assert torch.equal(load_artifact(dest)(x), q(x))


def _tampered_weights(folder, dest, fn, rehash=True):
    dest = _copy(folder, dest)
    t = load_file(str(dest / "weights.safetensors"))
    fn(t)
    save_file(t, str(dest / "weights.safetensors"))
    if rehash:
        _rehash(dest)
    return dest


def test_flipped_bytes_fail_the_hash(saved, tmp_path):
    _, _, _, folder = saved
    for name in ("weights.safetensors", "program.safetensors", "program.json"):
        dest = _copy(folder, tmp_path / name)
        data = bytearray((dest / name).read_bytes())
        data[len(data) // 2] ^= 0x40
        (dest / name).write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=f"{name}: contents do not match"):
            load_artifact(dest)


@pytest.mark.parametrize("case", ["nan_alpha", "bits_mismatch", "extra_tensor"])
def test_bcq_state_that_contradicts_itself_is_refused(saved, tmp_path, case):
    _, _, _, folder = saved

    def edit(t):
        key = next(k for k in t if k.endswith("alpha"))
        if case == "nan_alpha":
            t[key][0, 0, 0] = float("nan")
        elif case == "bits_mismatch":
            t[key] = t[key][:2].contiguous()
        else:
            t["n99.planes"] = torch.zeros(1, dtype=torch.uint8)

    dest = _tampered_weights(folder, tmp_path / case, edit)
    with pytest.raises(ArtifactError, match="nodes|weights.safetensors"):
        load_artifact(dest)


@pytest.mark.parametrize("case", ["codes", "scale"])
def test_uniform_codes_outside_bits_or_bad_scales_are_refused(tmp_path, case):
    _, _, q = _lowered("scheme=uniform,bits=4,group_size=32")
    folder = save_artifact(q, tmp_path / "u")

    def edit(t):
        key = next(k for k in t if k.endswith("codes" if case == "codes" else "scale"))
        t[key].view(-1)[0] = 100 if case == "codes" else float("nan")

    dest = _tampered_weights(folder, tmp_path / case, edit)
    with pytest.raises(ArtifactError, match="outside the 4-bit range" if case == "codes" else "NaN"):
        load_artifact(dest)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(nodes={}), "nodes: empty|belongs to no node"),
    (lambda m: m.update(pipeline=""), "pipeline"),
    (lambda m: next(iter(m["nodes"].values()))["qweight"].update(kind="evil"), "kind must be one of"),
    (lambda m: m.pop("target"), "target"),
    (lambda m: m.update(format="qgraph.artifact/1"), "unknown artifact format"),
    (lambda m: m["files"].update({"../x": m["files"]["weights.safetensors"]}), "not a plain file name"),
])
def test_manifest_tampering_is_refused(saved, tmp_path, edit, match):
    _, _, _, folder = saved
    dest = _copy(folder, tmp_path / "m")
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=match):
        load_artifact(dest)


@pytest.mark.parametrize("text", ["[]", '"model"', "null", "3", "{", "[" * 100000 + "]" * 100000])
def test_manifest_that_is_not_an_object_is_an_artifact_error(saved, tmp_path, text):
    _, _, _, folder = saved
    dest = _copy(folder, tmp_path / "m")
    (dest / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError):
        load_artifact(dest)


def test_program_naming_a_non_operator_is_refused(saved, tmp_path):
    _, _, _, folder = saved
    marker = tmp_path / "pwned"
    dest = _copy(folder, tmp_path / "m")
    text = (dest / "program.json").read_text()
    assert "torch.ops.aten.relu.default" in text
    (dest / "program.json").write_text(text.replace("torch.ops.aten.relu.default", "torch.serialization.load"))
    _rehash(dest)
    with pytest.raises(ArtifactError, match="not a registered torch operator"):
        load_artifact(dest)
    assert not marker.exists()


def test_cli_lower_checks_out_before_quantizing_and_replaces_the_folder(tmp_path, capsys):
    src = tmp_path / "net.py"
    src.write_text(FACTORY)
    spec = f"{src}:make_model"
    afile = tmp_path / "file"
    afile.write_text("x")
    for out in (str(afile), "/dev/null", "/proc/qgraph-out"):
        assert main(["lower", spec, "--out", out, "--quiet", "--no-measure"]) == EXIT_INPUT
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--out" in err or "cannot write" in err)
    out = tmp_path / "o"
    assert main(["lower", spec, "--out", str(out), "--quiet", "--no-measure"]) == EXIT_OK
    (out / "stale.txt").write_text("old")
    assert main(["lower", spec, "--out", str(out), "--quiet", "--no-measure"]) == EXIT_OK
    assert not (out / "stale.txt").exists() and (out / "model" / "manifest.json").exists()


def test_artifact_loads_in_a_fresh_process_without_the_source(saved, tmp_path):
    _, x, q, folder = saved
    torch.save(x, tmp_path / "x.pt")
    code = f'''
import sys, torch
from qgraph.artifact import load_artifact
y = load_artifact({str(folder)!r})(torch.load({str(tmp_path / "x.pt")!r}))
torch.save(y, {str(tmp_path / "y.pt")!r})
assert not any(m.startswith("qgraph_user_") for m in sys.modules)
'''
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), q(x))


def test_read_artifact_reports_the_file_and_field(saved, tmp_path):
    _, _, _, folder = saved
    dest = _copy(folder, tmp_path / "m")
    m = json.loads((dest / "manifest.json").read_text())
    name = next(iter(m["nodes"]))
    m["nodes"][name]["qparams"] = {"input0": [float("nan"), 0]}
    (dest / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=rf"manifest.json: nodes.{name}.qparams.input0"):
        read_artifact(dest)


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("name, options, module", [
    ("minilm", "scheme=bcq,bits=4,group_size=128", "qgraph.models.minilm"),
    ("mobilenetv2", "", "qgraph.models.mobilenetv2"),
])
def test_lowered_real_model_loads_alone_in_a_fresh_process(tmp_path, name, options, module):
    from qgraph.model_source import load_model_source
    from qgraph.models.registry import BUNDLED

    if not BUNDLED[name].available():
        pytest.skip(f"{name} is not installed")
    s = load_model_source(name, calib_batches=2)
    q = qgraph.quantize(s.module, s.example_inputs, target="x86-avx2", calib=s.calibration,
                        pipeline=qgraph.api.lowering_pipeline(options), dynamic_shapes=s.dynamic_shapes,
                        progress=False)
    folder = save_artifact(q, tmp_path / "model", source=name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["program"] is not None, manifest["program_note"]
    inputs = [tuple(b) for b in s.calibration[:2]]
    torch.save(inputs, tmp_path / "x.pt")
    with torch.no_grad():
        expect = [q(*b) for b in inputs]
    code = f'''
import sys, torch
from qgraph.artifact import load_artifact
m = load_artifact({str(folder)!r})
with torch.no_grad():
    ys = [m(*b) for b in torch.load({str(tmp_path / "x.pt")!r})]
torch.save(ys, {str(tmp_path / "y.pt")!r})
bad = [k for k in sys.modules if k in ({module!r}, "transformers", "qgraph.models.registry")]
assert not bad, bad
'''
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    assert len(got) == len(expect) and all(torch.equal(a, b) for a, b in zip(got, expect))
