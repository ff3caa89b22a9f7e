"""Quantize MobileNetV2 (real ImageNet weights) to int8 for x86-avx2, lower it, and compare predictions.

    python examples/mobilenetv2_images.py [--target x86-avx2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import qgraph
from qgraph.data.images import calibration_batches, evaluation_images
from qgraph.models.mobilenetv2 import load_mobilenetv2


def _ms(fn, x, repeats=10) -> float:
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="x86-avx2")
    args = ap.parse_args()
    model = load_mobilenetv2()
    calib = [(b,) for b in calibration_batches(4, batch_size=8)]
    q = qgraph.quantize(model, calib[0], target=args.target, calib=calib,
                        pipeline=qgraph.api.lowering_pipeline(fallback=True))
    images = evaluation_images(views=2)
    with torch.no_grad():
        ref, got = model(images), q(images)
    agree = (ref.argmax(1) == got.argmax(1)).float().mean()
    kl = torch.nn.functional.kl_div(got.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean")
    lowered = sum(r["status"] == "lowered" for r in q.report.get("lowering", []))
    print(f"{lowered} layers on int8 kernels; top-1 agreement with float on {len(images)} photos/crops: "
          f"{100 * agree:.1f}%, KL {kl:.4f}")
    one = images[:1]
    print(f"batch 1 latency: float {_ms(model, one):.1f} ms, lowered {_ms(q, one):.1f} ms")


if __name__ == "__main__":
    main()
