"""Quantize SmolLM2-135M's linear layers to BCQ and measure perplexity on an unseen Shakespeare play.

    python examples/smollm2_perplexity.py [--bits 4] [--windows 4]
"""
from __future__ import annotations

import argparse
import time

import qgraph
from qgraph.data.text import evaluation_plays, load_play
from qgraph.models.registry import BUNDLED
from qgraph.models.smollm2 import CausalLMLogits, load_smollm2, perplexity, token_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4, help="512-token evaluation windows")
    args = ap.parse_args()

    lm, tok = load_smollm2()
    text = load_play(evaluation_plays()[0])
    base = perplexity(lm, tok, text, max_windows=args.windows)
    example = (token_windows(tok, text, 64, 2),)
    start = time.perf_counter()
    q = qgraph.quantize(CausalLMLogits(lm).eval(), example, target="x86-avx2", frontend="export",
                        pipeline=f"annotate{{scheme=bcq,bits={args.bits},group_size={args.group_size},"
                                 f"embeddings=false}},quantize-weights,insert-fq",
                        dynamic_shapes=BUNDLED["smollm2"].dynamic_shapes())
    print(f"quantized {q.report['stats']['quantize-weights']['quantized']} layers in {time.perf_counter() - start:.0f} s")
    ppl = perplexity(q, tok, text, max_windows=args.windows)
    print(f"perplexity on {evaluation_plays()[0]} ({args.windows} x 512 tokens): fp32 {base:.2f}, "
          f"BCQ-{args.bits} g{args.group_size} {ppl:.2f}")


if __name__ == "__main__":
    main()
