"""fold-bn keeps outputs of random Conv/BN nets (eval mode) within 1e-5 relative."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qgraph import PassManager, trace
from tests.conftest import rel_err


def _random_net(draw_params, seed):
    torch.manual_seed(seed)
    layers, c = [], 3
    for out_c, k, groups_div, bias, affine, act in draw_params:
        groups = out_c // groups_div if (c % (out_c // groups_div) == 0 and out_c % (out_c // groups_div) == 0) else 1
        layers.append(nn.Conv2d(c, out_c, k, padding=k // 2, bias=bias, groups=groups))
        bn = nn.BatchNorm2d(out_c, affine=affine)
        with torch.no_grad():
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.05, 4)
            if affine:
                bn.weight.uniform_(-2, 2)
                bn.bias.uniform_(-1, 1)
        layers.append(bn)
        if act:
            layers.append(nn.ReLU())
        c = out_c
    return nn.Sequential(*layers).eval()


layer = st.tuples(st.sampled_from([4, 8, 12]), st.sampled_from([1, 3]), st.sampled_from([1, 2, 4]),
                  st.booleans(), st.booleans(), st.booleans())


@settings(max_examples=30, deadline=None)
@given(st.lists(layer, min_size=1, max_size=4), st.integers(0, 10_000), st.sampled_from(["fx", "export"]))
def test_fold_bn_preserves_outputs(params, seed, frontend):
    model = _random_net(params, seed)
    x = torch.randn(2, 3, 7, 7)
    g = trace(model, (x,), frontend=frontend)
    result = PassManager("fold-bn,dce").run(g)
    ops = [g.op_type(n) for n in result.graph.nodes()]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == len(params)
    x2 = torch.randn(3, 3, 7, 7)
    with torch.no_grad():
        assert rel_err(result.graph(x2), model(x2)) <= 1e-5
    assert result.stats["fold-bn"]["folded"] == len(params)


def test_bn_in_training_mode_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    g = trace(model, (torch.randn(2, 3, 4, 4),), frontend="fx")
    g.module_of(next(n for n in g.nodes() if g.op_type(n) == "BatchNormalization")).train()
    result = PassManager("fold-bn").run(g)
    assert not result.modified


def test_bn_after_conv_with_two_users_is_not_folded():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = TwoUsers().eval()
    x = torch.randn(1, 3, 4, 4)
    g = trace(model, (x,))
    result = PassManager("fold-bn").run(g)
    assert result.stats["fold-bn"]["folded"] == 0
    torch.testing.assert_close(result.graph(x), model(x))
