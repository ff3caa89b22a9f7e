"""qgraph lower --calib synthetic: data-free calibration through the genie pass."""
import json

import pytest

from qgraph.cli import EXIT_INPUT, EXIT_OK, main

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORY = '''
import torch, torch.nn as nn

def make_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return model, (torch.randn(2, 3, 16, 16),)

def make_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    return model, (torch.randn(2, 3, 16, 16),)
'''


def test_lower_with_synthetic_calibration(tmp_path, capsys):
    (tmp_path / "net.py").write_text(FACTORY)
    pipe = "genie{samples=4,batch_size=4,iters=2},fold-bn,annotate{bits=4,act_bits=8},calibrate,quantize-weights,insert-fq"
    code = main(["lower", f"{tmp_path / 'net.py'}:make_bn", "--calib", "synthetic", "--pipeline", pipe,
                 "--out", str(tmp_path / "o"), "--json", "--quiet", "--no-measure"])
    out = capsys.readouterr()
    assert code == EXIT_OK, out.err
    assert json.loads(out.out)["target"] == "x86-avx2"


def test_synthetic_calibration_needs_batchnorm(tmp_path, capsys):
    """Without --pipeline, genie goes in front of the default pipeline; a model without BatchNorm is bad input."""
    (tmp_path / "net.py").write_text(FACTORY)
    code = main(["lower", f"{tmp_path / 'net.py'}:make_plain", "--calib", "synthetic", "--out", str(tmp_path / "o"),
                 "--quiet", "--no-measure"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert "genie" in err and "BatchNorm" in err and "Traceback" not in err
