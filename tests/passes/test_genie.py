"""genie: synthetic calibration images distilled from BatchNorm statistics feed calibrate / adaround without
any real data; BNS loss goes down, seeded runs repeat, typed errors."""
import pytest
import torch
from torch import nn

import qgraph
import qgraph.data.images as images
from qgraph.errors import CalibrationError, PipelineError, SpecError
from qgraph.quant.genie import GenieOptions, bn_layers, bn_loss, synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


def _convnet(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    # running statistics of "real" images: smooth (upsampled 4x4 noise), standardised per channel like
    # ImageNet-normalised photos; white noise has the same per-channel moments but other feature statistics
    g = torch.Generator().manual_seed(seed)
    real = nn.functional.interpolate(torch.randn(256, 3, 4, 4, generator=g), size=16, mode="bilinear")
    real = (real - real.mean((0, 2, 3), keepdim=True)) / real.std((0, 2, 3), keepdim=True)
    for bn in bn_layers(m):
        bn.momentum = None  # cumulative average
    with torch.no_grad():
        m.train()(real)
    return m.eval()


def _bns_of(model, x):
    bns = bn_layers(model)
    feats = [None] * len(bns)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: feats.__setitem__(i, a[0])) for i, b in enumerate(bns)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    targets = [(b.running_mean, (b.running_var + b.eps).sqrt()) for b in bns]
    return float(bn_loss(feats, targets))


def test_distillation_matches_bn_statistics_and_repeats_with_a_seed():
    model = _convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = GenieOptions(samples=12, batch_size=8, iters=30, image_size=16, latent_dim=16, seed=3)
    out = synthesize(model, opts)
    assert [tuple(b.shape) for b in out] == [(8, 3, 16, 16), (4, 3, 16, 16)]
    noise = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fitted, white = _bns_of(model, out[0]), _bns_of(model, noise)
    assert fitted < 0.5 * white, (fitted, white)  # the BNS loss the images were fitted to
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert all(p.requires_grad for p in model.parameters())
    short = GenieOptions(samples=4, batch_size=4, iters=3, image_size=16, latent_dim=16, seed=3)
    first, again = synthesize(model, short), synthesize(model, short)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = synthesize(model, GenieOptions(**{**short.__dict__, "seed": 4}))
    assert not torch.equal(first[0], other[0])


def test_pipeline_calibrates_on_synthetic_images_only(monkeypatch):
    """calibrate and adaround run on what genie made; no photo loader is touched."""
    def no_photos(*a, **k):
        raise AssertionError("a real image was read")

    for name in ("load_photo", "_load_photo_cached", "sample_images", "load_image_folder"):
        monkeypatch.setattr(images, name, no_photos)
    model = _convnet(1)
    x = torch.randn(2, 3, 16, 16)
    pipe = ("genie{samples=8,batch_size=4,iters=10},fold-bn,annotate{bits=4,act_bits=8},calibrate,"
            "adaround{iters=10},quantize-weights,insert-fq")
    q = qgraph.quantize(model, (x,), pipeline=pipe, progress=False)
    st = q.report["stats"]
    assert st["genie"]["images"] == 8 and st["genie"]["batches"] == 2 and st["genie"]["bn_layers"] == 2
    assert st["genie"]["seconds"] > 0
    assert st["calibrate"]["batches"] == 2  # calibrate read the synthetic batches, not the example inputs
    assert st["fold-bn"]["folded"] == 2
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert float((got - ref).norm() / ref.norm()) < 0.5


def test_exported_graph_taps_its_batchnorm_ops():
    """torch.export graphs (what the CLI traces) hold BatchNorm as ATen ops, not modules: genie taps them."""
    model = _convnet(2)
    x = torch.randn(2, 3, 16, 16)
    pipe = "genie{samples=4,batch_size=4,iters=8},fold-bn,annotate{bits=8,act_bits=8},calibrate,quantize-weights,insert-fq"
    q = qgraph.quantize(model, (x,), pipeline=pipe, progress=False, frontend="export")
    st = q.report["stats"]
    assert st["genie"]["bn_layers"] == 2 and st["calibrate"]["batches"] == 1
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert float((got - ref).norm() / ref.norm()) < 0.2


def test_typed_errors():
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    flat(torch.randn(1, 3, 8, 8))
    with pytest.raises(CalibrationError, match="no BatchNorm"):
        qgraph.quantize(flat.eval(), (torch.randn(2, 3, 8, 8),), pipeline="genie{iters=1},annotate,calibrate",
                        progress=False)
    with pytest.raises(PipelineError):
        qgraph.PassManager("fold-bn,genie,annotate,calibrate")  # the statistics are folded away by then
    with pytest.raises(PipelineError, match="iters"):
        qgraph.PassManager("genie{iters=0}")
    with pytest.raises(SpecError, match="multiple of 8"):
        GenieOptions(image_size=20)


@pytest.mark.slow
def test_mobilenetv2_data_free_reads_no_real_image(monkeypatch):
    """The Genie pipeline on MobileNetV2 runs with every bundled-photo loader raising."""
    from qgraph.models.mobilenetv2 import load_mobilenetv2

    def no_photos(*a, **k):
        raise AssertionError("a real image was read")

    for name in ("load_photo", "_load_photo_cached", "sample_images", "load_image_folder"):
        monkeypatch.setattr(images, name, no_photos)
    model = load_mobilenetv2().eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    q = qgraph.quantize(model, (x,), pipeline="genie{samples=4,batch_size=4,iters=2},fold-bn,dce,fuse-activation,"
                        "annotate{bits=8,act_bits=8},calibrate,quantize-weights,insert-fq", progress=False)
    assert q.report["stats"]["genie"]["bn_layers"] == 52
    assert q.report["stats"]["calibrate"]["batches"] == 1
