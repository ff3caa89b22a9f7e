"""Evaluation sets for quantization quality: per bundled classifier, calibration batches and held-out
evaluation inputs, and the metrics that compare a quantized model with its fp32 reference.

- ``mobilenetv2``: calibration = augmented views of the calibration photos (``images.calibration_batches``);
  evaluation = the evaluation photos (disjoint from calibration), each as its center crop, the mirrored
  center crop and ``views`` random crops (random scale, random 224 window, random flip; fixed seed).
  Metrics: top-1 agreement with fp32 and KL(fp32 || quantized) of the softmax.
- ``digits-cnn``: calibration = training-split images; evaluation = the whole held-out test split (360
  images) with its real labels. Metrics: accuracy, plus agreement and KL to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qgraph.errors import CalibrationError

Inputs = tuple[torch.Tensor, ...]

#: Headline metrics per model, in table order (every set also gets the others that apply).
METRICS: dict[str, tuple[str, ...]] = {
    "mobilenetv2": ("agreement", "kl"),
    "digits-cnn": ("accuracy", "agreement", "kl"),
}
#: Whether a larger value of a metric is better.
HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "kl": False}


@dataclass(frozen=True)
class EvalSet:
    """Calibration batches and evaluation inputs (with labels where real labels exist) for one model."""

    model: str
    calibration: list[Inputs]
    inputs: torch.Tensor
    labels: torch.Tensor | None
    description: str

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.model]

    @property
    def example_inputs(self) -> Inputs:
        """Two calibration images: what to trace with (batch 2 keeps the batch dimension dynamic)."""
        return (self.calibration[0][0][:2],)


def mobilenetv2_eval_inputs(views: int = 14, seed: int = 1) -> torch.Tensor:
    """Evaluation photos, each as [center, mirrored center, ``views`` random crops/flips]:
    [6 * (2 + views), 3, 224, 224] in ``images.EVALUATION_PHOTOS`` order."""
    from qgraph.data import images

    if views < 0:
        raise CalibrationError(f"views must be >= 0, got {views}")
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    for name in images.EVALUATION_PHOTOS:
        img = images.load_photo(name)
        center = images.preprocess(img)
        out += [center, center.flip(-1)]
        out += images.augmented_views(img, views, gen)
    return torch.stack(out)


def mobilenetv2_set(quick: bool = False, *, views: int | None = None, calib_batches: int | None = None,
                    batch_size: int = 8) -> EvalSet:
    """Full: 96 evaluation images (6 photos x 16), 8 calibration batches of 8; quick: 24 and 4 x 8."""
    from qgraph.data import images

    views = (2 if quick else 14) if views is None else views
    n_cal = (4 if quick else 8) if calib_batches is None else calib_batches
    x = mobilenetv2_eval_inputs(views)
    cal = [(b,) for b in images.calibration_batches(n_cal, batch_size=batch_size)]
    desc = (f"{x.shape[0]} evaluation images ({len(images.EVALUATION_PHOTOS)} photos x [center, mirrored, "
            f"{views} random crops/flips]); calibration {n_cal * batch_size} views of "
            f"{len(images.CALIBRATION_PHOTOS)} other photos")
    return EvalSet("mobilenetv2", cal, x, None, desc)


def digits_set(quick: bool = False, *, calib_batches: int | None = None, batch_size: int = 32) -> EvalSet:
    """Full: the 360 test images, 8 calibration batches of 32 training images; quick: 4 batches."""
    from qgraph.data import digits

    n_cal = (4 if quick else 8) if calib_batches is None else calib_batches
    split = digits.digits_split()
    cal = [(b,) for b in digits.calibration_batches(n_cal, batch_size=batch_size)]
    desc = (f"{split.x_test.shape[0]} held-out test digits with labels; calibration "
            f"{len(cal) * batch_size} training digits")
    return EvalSet("digits-cnn", cal, split.x_test, split.y_test, desc)


_SETS = {"mobilenetv2": mobilenetv2_set, "digits-cnn": digits_set}


def eval_set(model: str, quick: bool = False, **kwargs) -> EvalSet:
    """The evaluation set of bundled classifier ``model`` (``mobilenetv2`` or ``digits-cnn``)."""
    if model not in _SETS:
        raise CalibrationError(f"no evaluation set for {model!r}; choose from {', '.join(sorted(_SETS))}")
    return _SETS[model](quick, **kwargs)


def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Logits of ``model`` over ``inputs``, in batches, without autograd."""
    with torch.no_grad():
        return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])


def agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of rows where the top-1 class equals the reference's."""
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean())


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(logits)), in nats."""
    p, q = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def classification_metrics(ref_logits: torch.Tensor, logits: torch.Tensor,
                           labels: torch.Tensor | None = None) -> dict[str, float]:
    """``agreement`` and ``kl`` to the reference, and ``accuracy`` when labels are given."""
    if ref_logits.shape != logits.shape:
        raise CalibrationError(f"reference logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} "
                               f"differ in shape")
    out = {"agreement": agreement(ref_logits, logits), "kl": kl(ref_logits, logits)}
    if labels is not None:
        out["accuracy"] = accuracy(logits, labels)
    return out


def evaluate(model: nn.Module, ref_logits: torch.Tensor, es: EvalSet, batch_size: int = 32) -> dict[str, float]:
    """`classification_metrics` of ``model`` on ``es``'s evaluation inputs against ``ref_logits``."""
    return classification_metrics(ref_logits, predict(model, es.inputs, batch_size), es.labels)
