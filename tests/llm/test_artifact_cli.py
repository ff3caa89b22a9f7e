"""LM artifacts (save → reload without calibrating, data only) and the ``qgraph generate`` / ``quantize-lm``
commands, on a tiny random Llama saved as a local Hugging Face folder."""
import copy
import json

import pytest
import torch

from qgraph.cli import main
from qgraph.errors import ExportError
from qgraph.llm import LMRecipe, apply_weights, quantize_lm
from qgraph.llm.artifact import builtin_causal_lm, load_lm, read_config, save_lm
from tests.llm.conftest import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("recipe", [
    LMRecipe(bits=3, group_size=32, optimizer="gptq"),
    LMRecipe(scheme="uniform", bits=4, group_size=16, optimizer="rtn"),
    LMRecipe(scheme="uniform", bits=3, group_size=None, optimizer="rtn", offset=False, head_bits=0),
    LMRecipe(scheme="uniform", bits=4, group_size=32, optimizer="gptq", head_group_size=32, scale_bits=6),
], ids=lambda r: r.name)
def test_artifact_reloads_into_the_same_generating_model(tmp_path, tiny, calib, recipe):
    lw = quantize_lm(tiny, recipe, calib)
    q = apply_weights(copy.deepcopy(tiny), lw, mode="exact")
    save_lm(tmp_path / "a", tiny, lw, tiny_tokenizer(), source="tiny")
    q2, tok, manifest = load_lm(tmp_path / "a", mode="exact")
    ids = tok("w5 w9 w200 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(q(ids).logits, q2(ids).logits)
        a = q.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        b = q2.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)
    b = manifest["bytes"]
    assert b["quantized"] == lw.nbytes  # codes, scales and zero points stored at their stated size
    assert b["total"] < sum(p.numel() * 4 for p in tiny.parameters())
    if recipe.scale_bits:  # block scales run on their own layout, the tied table included
        assert q2.lm_head.layout == "cpu-lut4k" and q2.model.embed_tokens.tied
    if recipe.head_bits == 0:  # float tied table: stored once, the head aliases it
        assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
        assert q2.lm_head.weight.data_ptr() == q2.model.embed_tokens.weight.data_ptr()


def test_tampered_or_foreign_artifacts_are_refused(tmp_path, tiny):
    lw = quantize_lm(tiny, LMRecipe(bits=2, group_size=32, optimizer="rtn"))
    art = save_lm(tmp_path / "a", tiny, lw, source="tiny")
    with pytest.raises(ExportError, match="SHA-256"):
        w = art / "weights.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
        load_lm(art)
    art = save_lm(tmp_path / "b", tiny, lw, source="tiny")
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_lm(art)
    with pytest.raises(ExportError, match="manifest.json is missing"):
        load_lm(tmp_path)
    with pytest.raises(ExportError, match="custom code"):
        builtin_causal_lm({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "evil.Model"}})
    with pytest.raises(ExportError, match="not a built-in"):
        builtin_causal_lm({"model_type": "evil-net"})


def test_saving_replaces_an_existing_artifact_whole(tmp_path, tiny):
    art = tmp_path / "a"
    lw = quantize_lm(tiny, LMRecipe(bits=2, group_size=32, optimizer="rtn"))
    save_lm(art, tiny, lw, source="first")
    (art / "stale.txt").write_text("left over")
    save_lm(art, tiny, lw, source="second")
    assert not (art / "stale.txt").exists()
    _, _, manifest = load_lm(art, tokenizer=False)
    assert manifest["source"] == "second" and manifest["recipe"]["bits"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary or old folder left beside it


@pytest.fixture(scope="module")
def artifact(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "bcq3"
    assert main(["quantize-lm", str(tiny_folder), "--out", str(out), "--bits", "3", "--group-size", "32",
                 "--optimizer", "gptq", "--calib-windows", "2", "--window", "16"]) == 0
    return out


def test_generate_streams_text_and_ends_with_json(tiny_folder, artifact, capsys):
    assert main(["generate", str(tiny_folder), "--artifact", str(artifact), "--prompt", "w5 w6 w77",
                 "--max-new-tokens", "12", "--ignore-eos", "--json"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) == {"text", "new_tokens", "prompt_tokens_per_s", "decode_tokens_per_s"}
    assert summary["new_tokens"] == 12 and summary["prompt_tokens_per_s"] > 0 and summary["decode_tokens_per_s"] > 0
    assert lines[0] == summary["text"] and len(summary["text"].split()) == 12  # streamed, then the summary
    assert "prompt: 3 tokens" in err and "decode: 12 tokens" in err
    # the same text as the artifact's model run by hand
    model, tok, _ = load_lm(artifact)
    ids = tok("w5 w6 w77", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert tok.decode(ref[0, 3:], skip_special_tokens=True) == summary["text"]


@pytest.mark.parametrize("case, code, message", [
    ("mismatch", 3, "was made from"),
    ("bundled-mismatch", 3, "not from 'smollm2'"),
    ("not-artifact", 3, "manifest.json is missing"),
    ("empty-prompt", 2, "prompt is empty"),
    ("zero-tokens", 2, "must be at least 1"),
])
def test_generate_errors_are_one_clear_line(tiny_folder, artifact, tmp_path, capsys, case, code, message):
    model, art, prompt, n = str(tiny_folder), str(artifact), "w5 w6", "4"
    if case == "mismatch":
        other = tmp_path / "other"
        tiny_llama(seed=3, hidden=32).save_pretrained(other)
        model = str(other)
    elif case == "bundled-mismatch":
        model = "smollm2"
    elif case == "not-artifact":
        art = model
    elif case == "empty-prompt":
        prompt = "  "
    else:
        n = "0"
    argv = ["generate", model, "--artifact", art, "--prompt", prompt, "--max-new-tokens", n]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == code
    assert len(err.splitlines()) == 1 and err.startswith("qgraph: error:") and message in err


def test_lower_writes_an_artifact_generate_runs(tiny_folder, tmp_path, capsys):
    out = tmp_path / "lowered"
    assert main(["lower", str(tiny_folder), "--scheme", "bcq", "--bits", "3", "--group-size", "32",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["recipe"] == "bcq3-g32-gptq" and summary["linear_bits_per_weight"] == 3 + 3 * 32 / 32  # codes + α
    _, _, manifest = load_lm(out, tokenizer=False)
    assert manifest["recipe"]["bits"] == 3 and manifest["recipe"]["group_size"] == 32
    assert "lm_head" in manifest["modules"] and manifest["tied"] == {"model.embed_tokens": "lm_head"}
    assert main(["generate", str(tiny_folder), "--artifact", str(out), "--prompt", "w5 w6", "--max-new-tokens",
                 "5", "--ignore-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_tokens"] == 5


@pytest.mark.parametrize("case, message", [
    ("graph-folder", "its model/ is a lowered graph"),
    ("graph-manifest", "format 'qgraph.artifact/2'"),
])
def test_generate_on_a_lowered_graph_says_how_to_make_an_lm_artifact(tiny_folder, tmp_path, capsys, case, message):
    art = tmp_path / "out"
    (art / "model").mkdir(parents=True)
    manifest = json.dumps({"format": "qgraph.artifact/2"})
    (art / "model" / "manifest.json").write_text(manifest)
    if case == "graph-manifest":
        art = art / "model"
    capsys.readouterr()
    rc = main(["generate", str(tiny_folder), "--artifact", str(art), "--prompt", "w5", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and len(err.splitlines()) == 1 and message in err and "qgraph lower MODEL" in err


def test_model_folder_config_is_read_as_data(tiny_folder):
    cls, cfg = builtin_causal_lm(read_config(tiny_folder))
    assert cls.__name__ == "LlamaForCausalLM" and cfg.hidden_size == 64


@pytest.mark.parametrize("scheme, reads", [("bcq", True), ("uniform", False)])
def test_quantize_lm_rtn_bcq_weighs_by_calibration_statistics(tiny_folder, tmp_path, monkeypatch, scheme, reads):
    import qgraph.llm.quantize as lmq

    seen = []
    real = lmq.calibration_rows
    monkeypatch.setattr(lmq, "calibration_rows", lambda *a, **k: seen.append(a) or real(*a, **k))
    assert main(["quantize-lm", str(tiny_folder), "--out", str(tmp_path / scheme), "--scheme", scheme,
                 "--bits", "3", "--group-size", "32", "--optimizer", "rtn", "--calib-windows", "2",
                 "--window", "16"]) == 0
    assert bool(seen) == reads


def test_quantize_lm_block_scales_from_the_command_line(tiny_folder, tmp_path, capsys):
    out = tmp_path / "k"
    rc = main(["quantize-lm", str(tiny_folder), "--out", str(out), "--scheme", "uniform", "--bits", "4",
               "--group-size", "32", "--head-group-size", "32", "--scale-bits", "6", "--optimizer", "rtn", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 4-bit codes, 12 bits of scale codes per group of 32, 32 bits of row scales per row: rows of 64 weights
    # (q/k/v/o, gate/up: 28672 weights) and of 128 (down: 8192)
    assert abs(summary["linear_bits_per_weight"] - (4 + 12 / 32 + (28672 * 32 / 64 + 8192 * 32 / 128) / 36864)) < 1e-3
    manifest = json.loads((out / "manifest.json").read_text())
    assert {e["kind"] for e in manifest["modules"].values()} == {"block_scaled"}
    capsys.readouterr()
    rc = main(["quantize-lm", str(tiny_folder), "--out", str(tmp_path / "bad"), "--scheme", "bcq", "--scale-bits", "6"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "scale_bits applies to scheme='uniform'" in err
