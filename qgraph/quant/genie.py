"""Genie-style data-free calibration data: images distilled from a convnet's BatchNorm statistics.

Per batch, a small generator G (latent → linear → 3 × [upsample ×2, conv 3×3, BatchNorm, LeakyReLU] →
conv 3×3 → tanh → per-channel standardisation) and one learnable latent vector per sample are trained
jointly with Adam so that every BatchNorm layer's batch mean and standard deviation of its input match the
running statistics it stored (the BNS loss, Σ_l ‖μ_l − μ̂_l‖₂ + ‖σ_l − σ̂_l‖₂). Swing convolution: while
distilling, the input of every stride-2 convolution is padded by one pixel (reflect) and cropped back at a
random offset, so the images cannot lock onto the stride's aliasing grid. The model's weights never change.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qgraph.errors import CalibrationError, SpecError


@dataclass(frozen=True)
class GenieOptions:
    """How many images, their shape, and the distillation budget (``iters`` Adam steps per batch)."""

    samples: int = 32
    batch_size: int = 16
    iters: int = 200
    image_size: int = 224
    channels: int = 3
    latent_dim: int = 128
    lr_generator: float = 0.05
    lr_latent: float = 0.05
    swing: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("samples", "batch_size", "iters", "image_size", "channels", "latent_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"genie {name} must be an integer >= 1, got {v!r}")
        if self.image_size % 8:
            raise SpecError(f"genie image_size must be a multiple of 8 (the generator upsamples 3 times), "
                            f"got {self.image_size}")
        for name in ("lr_generator", "lr_latent"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise SpecError(f"genie {name} must be a finite number > 0, got {v!r}")


class Generator(nn.Module):
    """Latent [N, latent_dim] → images [N, channels, size, size], standardised per channel."""

    def __init__(self, latent_dim: int, size: int, channels: int = 3, width: int = 64):
        super().__init__()
        self.init = size // 8
        self.width = width
        self.fc = nn.Linear(latent_dim, width * self.init * self.init)
        chans = [width, width, width // 2, width // 4]
        blocks: list[nn.Module] = [nn.BatchNorm2d(width)]
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                       nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        blocks += [nn.Conv2d(chans[-1], channels, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False)]
        self.body = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(z.shape[0], self.width, self.init, self.init))


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm modules that hold running statistics, in definition order."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


def strided_convs(modules: Iterable[nn.Module]) -> list[nn.Conv2d]:
    """The 2-d convolutions with a stride > 1 among ``modules`` (where swing convolution applies)."""
    return [m for m in modules if isinstance(m, nn.Conv2d) and max(m.stride) > 1]


def synthesize(model: nn.Module | Callable[[torch.Tensor], object], options: GenieOptions = GenieOptions(), *,
               bns: list[nn.Module] | None = None, convs: list[nn.Module] | None = None,
               params: Iterable[torch.Tensor] | None = None,
               progress: Callable[[Iterable], Iterable] | None = None,
               taps: tuple[list, list[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> list[torch.Tensor]:
    """Distill ``options.samples`` images from the BatchNorm statistics of ``model``: a list of batches
    [batch_size, channels, size, size] (the last one may be smaller).

    ``model`` is an ``nn.Module`` (its BatchNorms, stride-2 convs and parameters are found in it), or any
    callable that runs them, with ``bns`` / ``convs`` / ``params`` given. ``progress`` wraps the step
    iterator (``ceil(samples / batch_size) * iters`` steps). ``taps``: for graphs whose BatchNorms are not
    modules, a list the forward fills with each BatchNorm's input and their (running mean, running std); then
    ``bns`` is not used and swing convolution is the caller's (see `swing`). Deterministic for a given seed
    and thread count."""
    o = options
    if taps is not None:
        return _distill(model, o, taps[0], taps[1], [], progress)
    if isinstance(model, nn.Module):
        bns = bn_layers(model) if bns is None else bns
        convs = strided_convs(model.modules()) if convs is None else convs
        params = list(model.parameters()) if params is None else params
    bns = [b for b in (bns or []) if getattr(b, "running_mean", None) is not None]
    if not bns:
        raise CalibrationError("genie distills BatchNorm statistics, and this model has no BatchNorm layer with "
                               "running statistics: give real calibration data (--calib) instead")
    modes = [(b, b.training) for b in bns]
    for b in bns:
        b.eval()
    params = list(params or [])
    req = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    feats: list[torch.Tensor | None] = [None] * len(bns)
    hooks = [bn.register_forward_pre_hook(lambda m, a, i=i: feats.__setitem__(i, a[0])) for i, bn in enumerate(bns)]
    if o.swing:
        hooks += [c.register_forward_pre_hook(lambda mod, a: (swing(a[0], _GEN), *a[1:])) for c in convs or []]
    targets = [(bn.running_mean.detach().float(), (bn.running_var.detach().float() + bn.eps).sqrt()) for bn in bns]
    try:
        return _distill(model, o, feats, targets, hooks, progress)
    finally:
        for p, r in zip(params, req):
            p.requires_grad_(r)
        for b, mode in modes:
            b.train(mode)


_GEN = torch.Generator()


def swing(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Swing convolution's input: reflect-pad by one pixel and crop back at a random offset (NCHW only)."""
    if x.dim() != 4 or min(x.shape[-2:]) < 2:
        return x
    h, w = x.shape[-2:]
    dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=gen or _GEN))
    return F.pad(x, (1, 1, 1, 1), mode="reflect")[..., dy:dy + h, dx:dx + w]


def _distill(model, o: GenieOptions, feats: list, targets: list, hooks: list, progress) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(o.seed)
    _GEN.manual_seed(o.seed + 1)
    sizes = [min(o.batch_size, o.samples - s) for s in range(0, o.samples, o.batch_size)]
    steps = iter(progress(range(len(sizes) * o.iters)) if progress else range(len(sizes) * o.iters))
    out = []
    try:
        for n in sizes:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            g = Generator(o.latent_dim, o.image_size, o.channels)
            z = torch.randn(n, o.latent_dim, generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([{"params": g.parameters(), "lr": o.lr_generator},
                                    {"params": [z], "lr": o.lr_latent}], betas=(0.5, 0.999))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, o.iters)
            for _ in range(o.iters):
                next(steps, None)
                opt.zero_grad(set_to_none=True)
                feats[:] = [None] * len(feats)
                model(g(z))
                loss = bn_loss(feats, targets)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():  # the generator's BatchNorms stay on batch statistics, as trained
                out.append(g(z).detach())
    finally:
        for h in hooks:
            h.remove()
    return out


def bn_loss(feats: list[torch.Tensor | None], targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ over BatchNorm layers of ‖batch mean − running mean‖₂ + ‖batch std − running std‖₂ of their inputs."""
    total = torch.zeros(())
    for x, (mu, sd) in zip(feats, targets):
        if x is None:
            raise CalibrationError("a BatchNorm layer was not run by the model's forward; genie needs every "
                                   "BatchNorm it finds to be on the path from the input to the output")
        dims = [d for d in range(x.dim()) if d != 1]
        m = x.mean(dims)
        s = (x.var(dims, unbiased=False) + 1e-5).sqrt()
        total = total + (m - mu).norm() + (s - sd).norm()
    return total
