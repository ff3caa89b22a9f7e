"""qgraph::int8_linear / int8_conv2d: oneDNN int8 kernels on plain codes, prepacked once per codes tensor."""
import torch
import torch.nn.functional as F

from qgraph.kernels import onednn_ops


def _ref_linear(q, xs, xz, codes, ws, bias):
    return ((q.float() - xz) * xs) @ (codes.float() * ws[:, None]).t() + bias


def test_linear_matches_dequantized_math_and_repacks_after_an_edit():
    torch.manual_seed(0)
    q = torch.randint(0, 128, (5, 64), dtype=torch.uint8)
    codes = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    ws, bias = torch.rand(16) / 100 + 1e-3, torch.randn(16)
    y = torch.ops.qgraph.int8_linear(q, 0.05, 3, codes, ws, bias)
    torch.testing.assert_close(y, _ref_linear(q, 0.05, 3, codes, ws, bias), rtol=1e-5, atol=1e-4)
    n = len(onednn_ops._CACHE)
    torch.ops.qgraph.int8_linear(q, 0.05, 3, codes, ws, bias)
    assert len(onednn_ops._CACHE) == n  # served from the cache
    codes.neg_()  # an in-place edit bumps the version: packed again, never stale
    y2 = torch.ops.qgraph.int8_linear(q, 0.05, 3, codes, ws, bias)
    torch.testing.assert_close(y2, _ref_linear(q, 0.05, 3, codes, ws, bias), rtol=1e-5, atol=1e-4)
    del codes
    import gc

    gc.collect()
    assert len(onednn_ops._CACHE) <= n  # entries leave with their codes


def test_conv_matches_dequantized_math_with_clamp():
    torch.manual_seed(1)
    q = torch.randint(0, 100, (2, 8, 9, 9), dtype=torch.uint8)
    codes = torch.randint(-127, 128, (4, 8, 3, 3), dtype=torch.int8)
    ws, bias = torch.rand(4) / 50 + 1e-3, torch.randn(4)
    y = torch.ops.qgraph.int8_conv2d(q, 0.02, 5, codes, ws, bias, [2, 2], [1, 1], [1, 1], 1, 1.0, 0, False,
                                     "hardtanh", -0.5, 0.75)
    ref = F.conv2d((q.float() - 5) * 0.02, codes.float() * ws[:, None, None, None], bias, stride=2, padding=1)
    torch.testing.assert_close(y, ref.clamp(-0.5, 0.75), rtol=1e-4, atol=1e-4)
    fake = onednn_ops._conv_fake(q, 0.02, 5, codes, ws, bias, [2, 2], [1, 1], [1, 1], 1, 1.0, 0, False,
                                 "hardtanh", -0.5, 0.75)
    assert fake.shape == y.shape and fake.dtype == y.dtype
