"""``qgraph search`` on a small model: JSON summary and report files, exit codes, same seed same result."""
from __future__ import annotations

import json

import pytest
import torch

from qgraph.search.cli import main, parse_size
from tests.search import write_toy


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"))


def _run(capsys, args):
    old = torch.get_num_threads()
    try:
        rc = main(args)
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_search_json_report_and_determinism(spec, tmp_path, capsys):
    common = [spec, "--avg-bits", "3.5", "--trials", "8", "--workers", "0", "--hutchinson-iters", "4", "--quiet",
              "--json", "--driver", "nsga", "--seed", "3"]
    rc, out, err = _run(capsys, common + ["--cache", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "rep")])
    assert rc == 0, err
    s = json.loads(out)
    assert s["trials"] == 8 and s["chosen"]["avg_bits"] <= 3.5 and s["chosen"]["feasible"]
    for f in ("report.md", "report.html", "pareto.png", "bits.png", "strategy.json", "strategy.toml", "trials.json"):
        assert (tmp_path / "rep" / f).is_file(), f
    assert "bcq3-g128" in s["baselines"]
    rc, out2, _ = _run(capsys, common + ["--cache", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "rep2")])
    assert rc == 0 and json.loads(out2)["chosen"]["strategy_sha256"] == s["chosen"]["strategy_sha256"]
    # a rerun on the first cache evaluates nothing
    rc, out3, _ = _run(capsys, common + ["--cache", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "rep3")])
    s3 = json.loads(out3)
    assert s3["evaluated"] == 0 and s3["chosen"]["strategy_sha256"] == s["chosen"]["strategy_sha256"]


def test_exit_codes(spec, tmp_path, capsys):
    rc, _, err = _run(capsys, [spec, "--avg-bits", "0.5", "--trials", "3", "--workers", "0", "--quiet",
                               "--hutchinson-iters", "2", "--cache", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "r")])
    assert rc == 3 and err.startswith("qgraph: error: no strategy meets the constraints") and err.count("\n") == 1
    rc, _, err = _run(capsys, [spec, "--trials", "3", "--quiet"])
    assert rc == 2 and "at least one constraint" in err
    with pytest.raises(SystemExit) as e:
        main([spec, "--max-bytes", "lots"])
    assert e.value.code == 2
    assert "invalid size" in capsys.readouterr().err
    rc, _, err = _run(capsys, ["no/such/file.py:make", "--avg-bits", "4", "--quiet"])
    assert rc == 3 and "does not exist" in err


def test_parse_size():
    assert parse_size("25MB") == (25e6, None)
    assert parse_size("2MiB") == (2 * 2**20, None)
    assert parse_size("1.5e6") == (1.5e6, None)
    assert parse_size("30%") == (None, 0.30)
