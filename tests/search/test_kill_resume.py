"""SIGKILL a running search, resume it: no finished trial is lost or recomputed, and the result equals an
uninterrupted run's. Also: the killed run's worker processes do not outlive it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.search import write_toy

TRIALS = 20


def _cmd(spec: str, cache: Path, out: Path, workers: int) -> list[str]:
    # --no-anchor: anchors are cached like trials, but they run first, and the kill must land among the
    # driver's trials
    return [sys.executable, "-m", "qgraph.search.cli", spec, "--avg-bits", "3.5", "--trials", str(TRIALS),
            "--driver", "nsga", "--seed", "7", "--workers", str(workers), "--hutchinson-iters", "2",
            "--baselines", "", "--no-anchor", "--cache", str(cache), "--out", str(out), "--quiet", "--json"]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_then_resume(tmp_path, capsys):
    spec = write_toy(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "trials.jsonl"
    proc = subprocess.Popen(_cmd(spec, cache, tmp_path / "r1", workers=1), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.time() + 120
        while len(_lines(cache)) < 4 and time.time() < deadline and proc.poll() is None:
            workers.update(_children(proc.pid))
            time.sleep(0.01)
        workers.update(_children(proc.pid))
        assert proc.poll() is None, f"search ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r["key"]: r for r in _lines(cache)}
    assert 4 <= len(before) < TRIALS
    # the pool's workers notice their parent is gone and exit
    deadline = time.time() + 30
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    stray = [p for p in workers if _alive(p)]
    for p in stray:
        os.kill(p, signal.SIGKILL)
    assert not stray, f"worker processes outlived the killed search: {stray}"

    resumed = subprocess.run(_cmd(spec, cache, tmp_path / "r2", workers=1), env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    s = json.loads(resumed.stdout)
    after = _lines(cache)
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)), "a finished trial was recomputed"
    assert all(before[k] == {kk: vv for kk, vv in r.items()} for r in after for k in [r["key"]] if k in before)
    assert set(before) <= set(keys), "a finished trial was lost"
    # every finished trial came from the cache; only the rest ran
    assert s["anchors"] == {} and s["trials"] == TRIALS
    assert s["cached"] == len(before) and s["evaluated"] == TRIALS - len(before) == len(keys) - len(before)

    # an uninterrupted run, in this process (no interpreter start-up to pay for)
    from qgraph.search.cli import main

    old_threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        rc = main(_cmd(spec, tmp_path / "fresh.jsonl", tmp_path / "r3", workers=0)[3:])
    finally:
        torch.set_num_threads(old_threads)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    f = json.loads(out.out)
    assert f["chosen"]["strategy_sha256"] == s["chosen"]["strategy_sha256"]
    assert f["chosen"]["metric"] == s["chosen"]["metric"]
    assert sorted(r["key"] for r in _lines(tmp_path / "fresh.jsonl")) == sorted(keys)
