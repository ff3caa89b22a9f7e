"""Quantize SmolLM2-135M's linear layers to BCQ by round to nearest and measure perplexity on an unseen
Shakespeare play.

By default the weighted BCQ fit takes its importance from activation statistics (E[x_k^2] per input channel,
from ``--calib-windows`` windows of the calibration plays, never the evaluation play) and fits a per-group
offset z; ``--data-free`` reads no text and weighs by weight magnitude instead (it collapses on this model:
quantize-weights then warns which layers are worse than round-to-nearest uniform codes).

    python examples/smollm2_perplexity.py [--bits 3] [--group-size 64] [--windows 4] [--data-free] [--head]
"""
from __future__ import annotations

import argparse
import time

import qgraph
from qgraph.data.text import evaluation_plays, load_play
from qgraph.llm.quantize import calibration_rows
from qgraph.models.registry import BUNDLED
from qgraph.models.smollm2 import CausalLMLogits, load_smollm2, perplexity, token_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4, help="512-token evaluation windows")
    ap.add_argument("--calib-windows", type=int, default=8, help="512-token windows for activation statistics")
    ap.add_argument("--data-free", action="store_true", help="magnitude importance, no calibration text")
    ap.add_argument("--no-offset", action="store_true", help="no per-group offset z")
    ap.add_argument("--head", action="store_true", help="quantize the (tied) LM head too; default: float, as in "
                                                         "bench/quality_llm.py")
    args = ap.parse_args()

    lm, tok = load_smollm2()
    text = load_play(evaluation_plays()[0])
    base = perplexity(lm, tok, text, max_windows=args.windows)
    example = (token_windows(tok, text, 64, 2),)
    calib = None if args.data_free else [(r,) for r in calibration_rows(tok, args.calib_windows, 512)]
    importance = "spec" if args.data_free else "activation"
    skip = "" if args.head else ',skip=[".*lm_head"]'
    start = time.perf_counter()
    q = qgraph.quantize(CausalLMLogits(lm).eval(), example, target="x86-avx2", frontend="export", calib=calib,
                        pipeline=f"annotate{{scheme=bcq,bits={args.bits},group_size={args.group_size},"
                                 f"offset={str(not args.no_offset).lower()},act_bits=0,embeddings=false"
                                 f"{skip}}},"
                                 f"quantize-weights{{bcq_importance={importance}}},insert-fq",
                        dynamic_shapes=BUNDLED["smollm2"].dynamic_shapes())
    print(f"quantized {q.report['stats']['quantize-weights']['quantized']} layers in {time.perf_counter() - start:.0f} s")
    ppl = perplexity(q, tok, text, max_windows=args.windows)
    kind = "data-free" if args.data_free else f"activation statistics of {args.calib_windows} windows"
    print(f"perplexity on {evaluation_plays()[0]} ({args.windows} x 512 tokens): fp32 {base:.2f}, "
          f"BCQ-{args.bits} g{args.group_size}{'' if args.no_offset else '+z'} ({kind}; LM head "
          f"{'BCQ' if args.head else 'float'}) {ppl:.2f}")


if __name__ == "__main__":
    main()
