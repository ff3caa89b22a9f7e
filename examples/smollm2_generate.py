"""Quantize SmolLM2-135M to BCQ for BiQGEMM, save it as an artifact, reload it and generate text with it.

    python examples/smollm2_generate.py [--bits 3] [--optimizer rtn|gptq|aespa] [--out smollm2-bcq3]
                                        [--prompt "..."] [--max-new-tokens 64] [--mode exact|fast]
                                        [--engine auto|native|compiled|eager]

The artifact folder is made once (``--optimizer gptq`` takes a few minutes on 2 cores; ``rtn`` about one) and
reused on later runs; ``qgraph generate smollm2 --artifact DIR --prompt ...`` runs the same folder, and
``qgraph lower smollm2 --scheme bcq --bits 3 --out DIR`` makes an equivalent one from the command line. On
loading, q/k/v and gate/up run as one BiQGEMM call each (`qgraph.llm.fuse_shared_inputs`).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see qgraph.llm.runtime

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from qgraph.llm import LMRecipe, calibration_rows, quantize_lm  # noqa: E402
from qgraph.llm.artifact import load_lm, save_lm  # noqa: E402
from qgraph.llm.runtime import Generator  # noqa: E402
from qgraph.models.smollm2 import load_smollm2  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=192)
    ap.add_argument("--optimizer", choices=["rtn", "gptq", "aespa"], default="gptq")
    ap.add_argument("--out", help="artifact folder (default: smollm2-<recipe> here)")
    ap.add_argument("--prompt", default="The old king looked at his three daughters and said,")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--mode", choices=["exact", "fast"], default="exact")
    ap.add_argument("--engine", choices=["auto", "native", "compiled", "eager"], default="auto",
                    help="decode loop (qgraph.llm.runtime): auto runs the native step where the model qualifies")
    ap.add_argument("--compile", action="store_true", help="the same as --engine compiled")
    args = ap.parse_args()
    torch.set_num_threads(2)

    recipe = LMRecipe(bits=args.bits, group_size=args.group_size, optimizer=args.optimizer)
    out = Path(args.out or f"smollm2-{recipe.name}")
    if not (out / "manifest.json").is_file():
        start = time.perf_counter()
        lm, tok = load_smollm2(cache=False)
        calib = calibration_rows(tok, recipe.calib_windows, recipe.window) if recipe.optimizer != "rtn" else None
        lw = quantize_lm(lm, recipe, calib)
        save_lm(out, lm, lw, tok, source="smollm2")
        print(f"quantized SmolLM2 ({recipe.name}) in {time.perf_counter() - start:.0f} s -> {out}")
        del lm

    model, tok, manifest = load_lm(out, mode=args.mode)  # no calibration, no fp32 model needed
    b = manifest["bytes"]
    print(f"loaded {out}: {b['total'] / 1e6:.1f} MB stored, decoder linears at "
          f"{b['decoder_linears'] * 8 / b['decoder_linear_weights']:.2f} bits/weight")
    engine = "compiled" if args.compile else args.engine
    gen = Generator(model, tok, engine=engine, skip_module_guards=True)  # one model in this process
    print(args.prompt, end="", flush=True)
    res = gen.generate(args.prompt, args.max_new_tokens, on_text=lambda t: print(t, end="", flush=True))
    print(f"\n\nprompt {res.prompt_tokens} tokens at {res.prompt_tokens_per_s:.0f} tok/s; decode "
          f"{res.new_tokens} tokens at {res.decode_tokens_per_s:.1f} tok/s ({args.mode} mode"
          f", {gen.engine})", file=sys.stderr)


if __name__ == "__main__":
    main()
