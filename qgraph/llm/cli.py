"""``qgraph generate`` and ``qgraph quantize-lm``: run / make a quantized causal-LM artifact from the command line.

Wire into ``qgraph/cli.py``: ``from qgraph.llm.cli import add_parsers as add_llm_parsers`` and, in
``build_parser``, ``add_llm_parsers(sub)``. Errors follow ``qgraph.cli``: a wrong artifact or a model/artifact
mismatch raise `QGraphError` (one line, exit 3); an empty prompt or ``--max-new-tokens 0`` are usage errors
(one line, exit 2).

``generate`` streams the text to stdout, then prints prompt and decode tokens/s (stderr; with ``--json`` the
last stdout line is ``{"text", "new_tokens", "prompt_tokens_per_s", "decode_tokens_per_s"}``). Launched as a
program with ``OMP_WAIT_POLICY`` unset, it re-executes itself once with ``OMP_WAIT_POLICY=PASSIVE`` (libgomp
reads it only when torch loads, and active waiting made decode 5-10x slower on a shared 2-core machine; see
`qgraph.llm.runtime`); set the variable yourself, or ``QGRAPH_NO_REEXEC=1``, to avoid the re-execution.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from qgraph.errors import ExportError, ModelLoadError


def _tokens(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty; give some text to continue")
    return text


def add_parsers(subparsers: Any) -> None:
    """Add ``generate`` and ``quantize-lm`` to a ``qgraph`` subparsers object."""
    g = subparsers.add_parser("generate", help="generate text with a quantized causal-LM artifact (BiQGEMM)")
    g.add_argument("model", help="the model the artifact was made from: a bundled name (smollm2) or a local "
                                 "Hugging Face model folder")
    g.add_argument("--artifact", required=True, help="folder written by qgraph quantize-lm")
    g.add_argument("--prompt", required=True, type=_prompt)
    g.add_argument("--max-new-tokens", type=_tokens, default=64, dest="max_new_tokens")
    g.add_argument("--mode", choices=["exact", "fast"], default="exact",
                   help="BiQGEMM tables: exact (fp32; matches the simulation) or fast (int8)")
    g.add_argument("--engine", choices=["auto", "native", "compiled", "eager"], default="auto",
                   help="decode loop: native (one C++ call per token; Llama-family models), compiled (static KV "
                        "cache + torch.compile of the step), eager (Hugging Face generate()); auto: native where "
                        "the model qualifies, else eager")
    g.add_argument("--compile", choices=["on", "off"], default="off",
                   help="on: the same as --engine compiled (kept for older scripts)")
    g.add_argument("--threads", type=_tokens, help="intra-op threads (default: torch's)")
    g.add_argument("--ignore-eos", action="store_true", dest="ignore_eos",
                   help="always generate --max-new-tokens tokens (for timing)")
    g.add_argument("--json", action="store_true", help="last stdout line: a JSON summary")
    g.set_defaults(func=cmd_generate)

    q = subparsers.add_parser("quantize-lm", help="quantize a causal LM for generation and write an artifact")
    q.add_argument("model", help="a bundled name (smollm2) or a local Hugging Face model folder")
    q.add_argument("--out", required=True, help="artifact folder to write (replaced if present)")
    q.add_argument("--scheme", choices=["bcq", "uniform"], default="bcq")
    q.add_argument("--bits", type=int, default=3)
    q.add_argument("--group-size", type=int, default=192, dest="group_size", help="0: one scale set per row")
    q.add_argument("--optimizer", choices=["rtn", "gptq", "aespa"], default="gptq")
    q.add_argument("--offset", choices=["auto", "on", "off"], default="auto",
                   help="BCQ offset z / uniform zero point (auto: BCQ off, uniform on)")
    q.add_argument("--head-bits", type=int, dest="head_bits", help="LM head + embedding bits (0: float)")
    q.add_argument("--head-group-size", type=int, default=64, dest="head_group_size",
                   help="LM head + embedding group size (0: one scale set per row)")
    q.add_argument("--scale-bits", type=int, dest="scale_bits",
                   help="uniform only: block scales, w = d*c - m per group with d and m as N-bit codes of two fp16 "
                        "scales per row (K-quant style; 6 with --group-size 32 is 4.43 bits per weight)")
    q.add_argument("--calib-windows", type=_tokens, default=16, dest="calib_windows")
    q.add_argument("--window", type=_tokens, default=512)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize_lm)


# ------------------------------------------------------------------------------------------ model sources
def load_float_lm(model: str) -> tuple[Any, Any]:
    """(float HF causal LM, tokenizer) for a bundled name or a local HF folder (built-in classes only)."""
    if Path(model).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qgraph.llm.artifact import builtin_causal_lm, read_config

        builtin_causal_lm(read_config(model))  # refuses custom code before transformers sees the folder
        try:
            lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=False, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load a causal LM from {model}: {str(e).splitlines()[0]}") from None
        return lm.eval(), tok
    if model == "smollm2":
        from qgraph.models.smollm2 import load_smollm2

        lm, tok = load_smollm2(cache=False)
        return lm, tok
    raise ModelLoadError(f"{model!r} is not a causal LM qgraph knows: give 'smollm2' or a local Hugging Face "
                         f"model folder (with config.json)")


def check_model_matches(model: str, manifest: dict, artifact: str) -> None:
    """Raise `ExportError` when the artifact was not made from ``model``."""
    from qgraph.llm.artifact import fingerprint, read_config

    src = manifest.get("source")
    if Path(model).is_dir():
        if fingerprint(read_config(model)) != manifest.get("fingerprint"):
            raise ExportError(f"the artifact {artifact} was made from {src!r}, not from the model in {model} "
                              f"(their config.json differ)")
        return
    if model != src:
        raise ExportError(f"the artifact {artifact} was made from {src!r}, not from {model!r}")


# ------------------------------------------------------------------------------------------ commands
def _maybe_reexec() -> None:
    if "OMP_WAIT_POLICY" in os.environ or os.environ.get("QGRAPH_NO_REEXEC"):
        return
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog not in ("qgraph", "cli.py"):  # called in-process (tests, notebooks): leave the process alone
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "qgraph.cli", *sys.argv[1:]])


def cmd_generate(args: argparse.Namespace) -> int:
    _maybe_reexec()
    import torch

    from qgraph.llm.artifact import load_lm, read_lm_artifact
    from qgraph.llm.runtime import Generator

    if args.threads:
        torch.set_num_threads(args.threads)
    manifest, _ = read_lm_artifact(args.artifact)
    check_model_matches(args.model, manifest, args.artifact)
    model, tok, _ = load_lm(args.artifact, mode=args.mode)
    if tok is None:
        raise ExportError(f"the artifact {args.artifact} holds no tokenizer/ folder")
    # one model per process: nn-module guards can go (the model does not change under the compiled step)
    engine = "compiled" if args.compile == "on" else args.engine
    gen = Generator(model, tok, engine=engine, skip_module_guards=True)
    if engine == "auto" and gen.native_error:
        print(f"qgraph: decoding with generate() ({gen.native_error})", file=sys.stderr)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if not ids.numel():
        raise ExportError("the prompt encodes to no tokens")
    gen.generate(ids[:, :1], 2)  # first-call setup (thread pools, lazy inits) stays out of the timed run

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = gen.generate(args.prompt, args.max_new_tokens, on_text=show, stop_at_eos=not args.ignore_eos)
    sys.stdout.write("\n")
    print(f"prompt: {res.prompt_tokens} tokens, {res.prompt_tokens_per_s:.1f} tok/s; decode: {res.new_tokens} "
          f"tokens, {res.decode_tokens_per_s:.1f} tok/s ({args.mode} mode"
          f", {gen.engine}, {torch.get_num_threads()} threads)", file=sys.stderr)
    if args.json:
        print(json.dumps(res.summary()))
    return 0


def cmd_quantize_lm(args: argparse.Namespace) -> int:
    from qgraph.llm.recipe import LMRecipe

    recipe = LMRecipe(scheme=args.scheme, bits=args.bits, group_size=args.group_size or None,
                      optimizer=args.optimizer, offset=None if args.offset == "auto" else args.offset == "on",
                      head_bits=args.head_bits, head_group_size=args.head_group_size, scale_bits=args.scale_bits,
                      calib_windows=args.calib_windows, window=args.window)
    return _write_lm(args.model, recipe, args.out, args.json)


def is_causal_lm(model: str) -> bool:
    """Whether ``model`` names a causal LM: the bundled ``smollm2`` or a local Hugging Face folder whose
    config.json lists a ``*ForCausalLM`` architecture."""
    if model == "smollm2":
        return True
    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
        return False
    return isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs)


def lowers_to_lm(args: argparse.Namespace) -> bool:
    """Whether ``qgraph lower`` should write a generating LM artifact (what `cmd_lower_lm` does): a causal LM,
    weight-only, without a pipeline / config of its own and for the torch runtime."""
    return (is_causal_lm(args.model) and not args.pipeline and not args.config and not args.act_bits
            and args.runtime == "torch")


def cmd_lower_lm(args: argparse.Namespace) -> int:
    """``qgraph lower`` of a causal LM: `LMRecipe` defaults (GPTQ, the LM head and the tied table quantized)
    with ``--scheme`` / ``--bits`` / ``--group-size`` applied, written as an artifact ``qgraph generate`` runs."""
    import dataclasses

    from qgraph.llm.recipe import LMRecipe

    changes = {k: v for k, v in (("scheme", args.scheme), ("bits", args.bits), ("group_size", args.group_size))
               if v is not None}
    recipe = dataclasses.replace(LMRecipe(), **changes)
    out = args.out or f"qgraph-out/{Path(args.model).name}-{recipe.name}"
    return _write_lm(args.model, recipe, out, args.json)


def _write_lm(model_name: str, recipe: Any, out_arg: str, as_json: bool) -> int:
    import time

    from qgraph.llm.artifact import save_lm
    from qgraph.llm.quantize import calibration_rows, quantize_lm

    out = Path(out_arg)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    t0 = time.perf_counter()
    model, tok = load_float_lm(model_name)
    # rtn BCQ weighs its fit by the calibration rows' activation statistics; only rtn uniform reads none.
    needs_calib = recipe.optimizer != "rtn" or recipe.scheme == "bcq"
    calib = calibration_rows(tok, recipe.calib_windows, recipe.window) if needs_calib else None
    lw = quantize_lm(model, recipe, calib)
    save_lm(out, model, lw, tok, source=model_name)
    from qgraph.llm.artifact import read_lm_artifact

    manifest, _ = read_lm_artifact(out)
    b = manifest["bytes"]
    summary = {"out": str(out), "recipe": recipe.name, "bytes": b["total"],
               "linear_bits_per_weight": round(b["decoder_linears"] * 8 / max(1, b["decoder_linear_weights"]), 3),
               "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary) if as_json else
          f"wrote {out}: {recipe.name}, {b['total'] / 1e6:.1f} MB, decoder linears at "
          f"{summary['linear_bits_per_weight']} bits/weight ({summary['seconds']} s)")
    return 0
