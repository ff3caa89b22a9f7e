"""MobileNetV2 calibration quality (issue 22): activation observers at W8A8, the clip-search default at W4A8,
and Genie-style data-free calibration at W4A8 against the same pipeline calibrated on real photos.

Every row is one ``qgraph.quantize`` run (2 threads) of the simulated (fake-quant) model, evaluated on the 96
bundled evaluation views (6 evaluation photos x [center, mirror, 14 random crops]) against fp32: top-1
agreement and KL(fp32 || quantized). Calibration never reads the evaluation photos:

- ``real64``: the evaluation set's 8 batches of 8 augmented views of the 11 calibration photos;
- ``real11``: the 11 calibration photos' center crops (one batch);
- ``genie``: no photo at all: the ``genie`` pass distills images from the BatchNorm statistics (its options in
  the row name); every photo loader of ``qgraph.data.images`` is made to raise while such a row runs.

``seconds`` is the whole quantize call; ``genie s`` the distillation alone. ``--quick``: the W4A8 RTN row and a
tiny Genie row (proves the path, not the quality). ``--rows`` picks rows by name.

    python bench/quality_mobilenetv2.py [--quick] [--json out.json] [--rows NAME ...]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _records import Records, machine, markdown_table

import qgraph
from qgraph.data import images
from qgraph.data.eval_sets import eval_set, evaluate, predict
from qgraph.instruments import TimingInstrument
from qgraph.models.mobilenetv2 import load_mobilenetv2

CANON = "fold-bn,dce,fuse-activation"
GENIE = "genie{samples=16,batch_size=8,iters=40}"
GENIE_QUICK = "genie{samples=4,batch_size=4,iters=3}"
ADAROUND = "adaround{iters=200}"


def _pipe(bits: int, act_bits: int, observer: str | None = None, method: str | None = None,
          genie: str | None = None) -> str:
    cal = f"calibrate{{method={observer}}}" if observer else "calibrate"
    parts = ([genie] if genie else []) + [CANON, f"annotate{{bits={bits},act_bits={act_bits}}}", cal]
    parts += ([method] if method else []) + ["quantize-weights", "insert-fq"]
    return ",".join(parts)


# name -> (calibration, pipeline)
ROWS: dict[str, tuple[str, str]] = {
    "W8A8 minmax": ("real64", _pipe(8, 8, "minmax")),
    "W8A8 entropy": ("real64", _pipe(8, 8, "entropy")),
    "W8A8 minmax (11 photos)": ("real11", _pipe(8, 8, "minmax")),
    "W8A8 entropy (11 photos)": ("real11", _pipe(8, 8, "entropy")),
    "W4A8 RTN": ("real64", _pipe(4, 8)),
    "W4A8 clip-search (default)": ("real64", _pipe(4, 8, method="clip-search")),
    "W4A8 clip-search{holdout=0,max_batches=4} (old default)": (
        "real64", _pipe(4, 8, method="clip-search{holdout=0,max_batches=4}")),
    f"W4A8 {ADAROUND} (11 photos)": ("real11", _pipe(4, 8, method=ADAROUND)),
    f"W4A8 {ADAROUND} ({GENIE})": ("genie", _pipe(4, 8, method=ADAROUND, genie=GENIE)),
    f"W4A8 RTN ({GENIE})": ("genie", _pipe(4, 8, genie=GENIE)),
}
QUICK_ROWS = {"W4A8 RTN": ROWS["W4A8 RTN"],
              f"W4A8 RTN ({GENIE_QUICK})": ("genie", _pipe(4, 8, genie=GENIE_QUICK))}


@contextmanager
def no_photos():
    """Every bundled-photo / image-folder loader raises while inside."""
    def refuse(*a, **k):
        raise RuntimeError("a real image was read during data-free calibration")

    names = ("load_photo", "_load_photo_cached", "sample_images", "load_image_folder", "calibration_images",
             "calibration_batches")
    saved = {n: getattr(images, n) for n in names}
    try:
        for n in names:
            setattr(images, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(images, n, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="W4A8 RTN and a tiny Genie row")
    ap.add_argument("--json", metavar="PATH", help="write records (case, metric, value) as JSON")
    ap.add_argument("--rows", nargs="+", help=f"rows to run (default all): {', '.join(ROWS)}")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows_def = QUICK_ROWS if args.quick else ROWS
    if args.rows:
        unknown = [r for r in args.rows if r not in ROWS and r not in QUICK_ROWS]
        if unknown:
            raise SystemExit(f"quality_mobilenetv2: unknown rows {unknown}; choose from {list(ROWS)}")
        rows_def = {r: {**ROWS, **QUICK_ROWS}[r] for r in args.rows}
    model = load_mobilenetv2().eval()
    es = eval_set("mobilenetv2")
    ref = predict(model, es.inputs)
    calib = {"real64": es.calibration, "real11": [(images.calibration_images(augment=False),)], "genie": None}
    example = (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    rec, table = Records(), []
    start = time.perf_counter()
    for name, (cal, pipe) in rows_def.items():
        timing = TimingInstrument()
        load = os.getloadavg()[0]
        t = time.perf_counter()
        with no_photos() if cal == "genie" else _nothing():
            q = qgraph.quantize(copy.deepcopy(model), example, calib=calib[cal], pipeline=pipe, progress=False,
                                instruments=[timing])
        secs = time.perf_counter() - t
        genie_s = q.report.get("genie", {}).get("seconds")
        m = evaluate(q, ref, es)
        rec.add(f"mobilenetv2 {name}", "agreement", m["agreement"], pipeline=pipe, calibration=cal)
        rec.add(f"mobilenetv2 {name}", "kl", m["kl"])
        rec.add(f"mobilenetv2 {name}", "seconds", secs, load=load)
        if genie_s is not None:
            rec.add(f"mobilenetv2 {name} genie", "seconds", genie_s, load=load)
        table.append([name, cal, m["agreement"], m["kl"], f"{secs:.0f}",
                      "-" if genie_s is None else f"{genie_s:.0f}", f"{load:.1f}"])
        print(f"{name}: agreement={m['agreement']:.4f} kl={m['kl']:.4f} {secs:.0f}s (load {load:.1f})", flush=True)
    print()
    print(markdown_table(["row", "calibration", "top-1 agreement", "KL to fp32", "seconds", "genie s",
                          "load (1 min)"], table))
    print(f"\n{es.description}; {machine()}, torch threads 2, total {time.perf_counter() - start:.0f} s")
    rec.write(args.json)
    return 0


@contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    sys.exit(main())
