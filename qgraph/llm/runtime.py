"""Greedy generation with a KV cache, timed and streamed. Engines:

- ``"eager"``: Hugging Face ``generate()``.
- ``"native"``: qgraph's own loop over a static KV cache, the prompt eager, then one native call per token
  (`qgraph.llm.native_decode`: every layer, the head and the argmax in C++). Llama-family models only.
- ``"compiled"`` (``compile=True``): the same loop with a ``torch.compile``d decode step.
- ``"auto"``: native where the model qualifies, else eager.

Timing: the prompt time is from the call to the first new token (prefill forward + first argmax); the decode
rate counts the tokens after the first over the time from the first to the last.

``compile=True``: a transformers `StaticCache` sized to a bucket of `CACHE_BUCKET` tokens (so other prompt
lengths reuse the compiled step), the prompt run eager into it, then one compiled function per token: the
model's forward for one token *and* the greedy argmax (one graph, no logits leave it). The loop is qgraph's,
not ``generate()``'s: on SmolLM2 BCQ-3 ``generate()``'s per-token work (logits processors, stopping criteria,
``prepare_inputs_for_generation``, cache bookkeeping) was 2.3-2.6 ms of a 15-17 ms step, and the same compiled
model decoded 64 tok/s under ``generate()`` against 77-82 with this loop (2 threads, quiet machine).
A compile failure (or a compiled step failing when it runs) falls back to eager ``generate()`` with one
warning line. ``skip_module_guards`` drops dynamo's guards on nn.Module state, checked on every step; only for
a process that compiles this one model and never changes it.

Attention: ``decode_attention=True`` (default) switches SDPA models to `qgraph.llm.attention` (one-token steps
on the ``qgraph::decode_attention`` op: no per-head copy of the cache, masked positions skipped).

Threads: on this 2-core VM, shared with other processes, libgomp's default active waiting (workers spin
after every parallel region) costs 5-10x at decode: Hugging Face fp32 alone (qgraph not imported) decodes
2.9 tok/s with the default policy and 15 tok/s with ``OMP_WAIT_POLICY=PASSIVE``; qgraph BCQ-3 3.4-4.3 vs 30-35.
libgomp reads the variable only when it loads (with torch), so entry points set it before importing torch:
bench/decode_llm.py, examples/smollm2_generate.py, and ``qgraph generate`` (which re-executes itself once).
"""
from __future__ import annotations

import gc
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qgraph.errors import KernelError

CACHE_BUCKET = 256
ENGINES = ("auto", "native", "compiled", "eager")


@dataclass
class GenerationResult:
    text: str
    ids: Any
    prompt_tokens: int
    new_tokens: int
    prompt_seconds: float
    decode_seconds: float
    token_times: list[float] = field(default_factory=list, repr=False)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")

    def summary(self) -> dict:
        return {"text": self.text, "new_tokens": self.new_tokens,
                "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3)}


class _Streamer:
    """Timestamps each ``put``; decodes new tokens incrementally for ``on_text`` (text is emitted once it no
    longer ends in an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.printed = 0

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            return  # the prompt
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.on_text is None or self.tokenizer is None:
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)


class Generator:
    """Greedy generation for one model + tokenizer on one of `ENGINES` (see the module doc)."""

    def __init__(self, model: Any, tokenizer: Any, *, compile: bool = False, bucket: int = CACHE_BUCKET,
                 backend: Any = "inductor", skip_module_guards: bool = False, decode_attention: bool = True,
                 engine: str | None = None):
        if engine is None:
            engine = "compiled" if compile else "eager"
        if engine not in ENGINES:
            raise KernelError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model, self.tokenizer = model, tokenizer
        self.native: Any = None
        self.native_error: str | None = None
        if engine in ("native", "auto"):
            from qgraph.llm.native_decode import plan_for

            got = plan_for(model)
            if isinstance(got, str):
                if engine == "native":
                    raise KernelError(f"this model cannot run the native decode step: {got}")
                self.native_error, engine = got, "eager"
            else:
                self.native, engine = got, "native"
        self.engine = engine
        compile = engine == "compiled"
        self.compile, self.bucket, self.backend = compile, bucket, backend
        self.skip_module_guards = skip_module_guards
        self.compile_seconds: float | None = None
        self.compile_error: str | None = None
        self.decode_attention = False
        if decode_attention and engine != "native":
            from qgraph.llm.attention import use_decode_attention

            self.decode_attention = use_decode_attention(model)
        self._cache: Any = None
        self._cache_len = 0
        self._step: Callable | None = None
        self._suppress: tuple[int, ...] = ()

    def compile_options(self) -> dict | None:
        """Options for ``torch.compile`` of the decode step (None: the backend's defaults)."""
        # Inductor's own kernels single-threaded: the decode glue is a few KB per op, and an OpenMP team per
        # fused kernel stalls whenever the other core is busy (measured: 17-28 ms of generated code per step
        # with 2 threads, 4-5 ms with 1, under load); BiQGEMM and attention keep their own threads
        opts: dict[str, Any] = {"cpp.threads": 1} if self.backend == "inductor" else {}
        if self.skip_module_guards:
            import torch

            opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        return opts or None

    def _static_cache(self, total: int):
        """The static KV cache for ``total`` positions (rounded up to the bucket), reused and reset across calls."""
        from transformers import StaticCache

        max_len = -(-total // self.bucket) * self.bucket
        if self._cache is None or self._cache_len != max_len:
            self._cache, self._cache_len = StaticCache(config=self.model.config, max_cache_len=max_len), max_len
        else:
            self._cache.reset()
        return self._cache

    def _compiled_step(self) -> Callable:
        if self._step is None:
            import torch

            model = self.model

            def step(token, position, cache):
                logits = model(input_ids=token, cache_position=position, cache=cache, use_cache=True).logits[:, -1]
                if self._suppress:  # a constant of the compiled graph (a new tuple recompiles once)
                    logits[:, list(self._suppress)] = float("-inf")
                return logits.argmax(-1, keepdim=True)

            self._step = torch.compile(step, fullgraph=False, dynamic=False, backend=self.backend,
                                       options=self.compile_options())
        return self._step

    def _static_loop(self, ids, max_new_tokens: int, streamer: _Streamer, eos: set[int],
                     suppress: tuple[int, ...] = ()):
        """Prefill eager into a static cache, then one compiled or native step per token; returns
        [1, prompt + new] ids. ``eos``: ids that end the generation; ``suppress``: ids never chosen (the end
        tokens when generating a fixed count, as ``generate(min_new_tokens=...)`` does)."""
        import torch

        n = ids.shape[1]
        cache = self._static_cache(n + max_new_tokens)
        self._suppress = suppress
        with torch.no_grad():
            streamer.put(ids)
            logits = self.model(input_ids=ids, cache_position=torch.arange(n), cache=cache, use_cache=True).logits
            logits = logits[:, -1]
            if suppress:
                logits[:, list(suppress)] = float("-inf")
            token = logits.argmax(-1, keepdim=True)
            new = [token]
            streamer.put(token)
            if self.native is not None:
                self.native.bind(cache)
                self.native.suppress(suppress)
                step, t = self.native.step, int(token)
                # a cyclic-GC pass walks every object of the process (the model's modules and tensors; 4% of a
                # perf profile of this loop); the loop makes no cycles, so collection waits until it ends
                paused = gc.isenabled()
                gc.disable()
                try:
                    for i in range(1, max_new_tokens):
                        if eos and t in eos:
                            break
                        t = step(t, n + i - 1)
                        token = torch.tensor([[t]])
                        new.append(token)
                        streamer.put(token)
                finally:
                    if paused:
                        gc.enable()
            else:
                step = self._compiled_step()
                for i in range(1, max_new_tokens):
                    if eos and int(token) in eos:
                        break
                    token = step(token, torch.tensor([n + i - 1]), cache)
                    new.append(token)
                    streamer.put(token)
        streamer.end()
        return torch.cat([ids, *new], dim=1)

    def _run(self, ids, pad, kw: dict, max_new_tokens: int):
        import torch

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if (self.compile or self.native is not None) and ids.shape[0] == 1:  # the static loop is batch 1
                eos = _eos_ids(self.model)
                if kw.get("min_new_tokens"):
                    return self._static_loop(ids, max_new_tokens, kw["streamer"], set(), tuple(sorted(eos)))
                return self._static_loop(ids, max_new_tokens, kw["streamer"], eos)
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kw)

    def _give_up(self, e: Exception) -> None:
        """Run eager from now on, with one warning line naming the compiler's own error."""
        import torch

        root = getattr(e, "inner_exception", None) or e.__cause__ or e  # dynamo wraps the compiler's error
        first = (str(root).strip().splitlines() or [""])[0][:200]
        self.compile_error = f"{type(root).__name__}: {first}"
        print(f"qgraph: torch.compile of the decode step failed ({self.compile_error}); running eager",
              file=sys.stderr)
        self.compile = False
        self._step = None
        torch._dynamo.reset()

    def encode(self, prompt) -> Any:
        import torch

        if isinstance(prompt, torch.Tensor):
            return prompt if prompt.dim() == 2 else prompt[None]
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    def warmup(self, prompt_tokens: int = 8, max_new_tokens: int = 3) -> None:
        """Compile the decode step (for a cache bucket that fits the next call); on failure fall back to eager
        with one warning line. No-op when eager."""
        if not self.compile or self.compile_seconds is not None:
            return
        import torch

        ids = torch.full((1, prompt_tokens), 1, dtype=torch.long)
        # each model instance compiles its own graph (guards on the module); room for several per process
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 512)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._static_loop(ids, max(2, max_new_tokens), _Streamer(None, None), set())
            self.compile_seconds = time.perf_counter() - start
        except Exception as e:  # any compiler failure: run eager
            self._give_up(e)

    def generate(self, prompt, max_new_tokens: int, *, on_text: Callable[[str], None] | None = None,
                 stop_at_eos: bool = True) -> GenerationResult:

        ids = self.encode(prompt)
        self.warmup()
        streamer = _Streamer(self.tokenizer, on_text)
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "streamer": streamer}
        if not stop_at_eos:
            kw["min_new_tokens"] = max_new_tokens
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if pad is None:
            pad = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0]
        try:
            out = self._run(ids, pad, kw, max_new_tokens)
        except Exception as e:  # compiled code that fails when it runs (an Inductor bug): the same, eager
            if not self.compile:
                raise
            self._give_up(e)
            streamer = _Streamer(self.tokenizer, on_text)
            kw["streamer"] = streamer
            out = self._run(ids, pad, kw, max_new_tokens)
        new = out[0, ids.shape[1]:]
        t = streamer.times
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer is not None else ""
        return GenerationResult(text, out, ids.shape[1], int(new.numel()), t[1] - t[0] if len(t) > 1 else 0.0,
                                t[-1] - t[1] if len(t) > 2 else 0.0, t)


def _eos_ids(model: Any) -> set[int]:
    """The token ids that end a greedy generation (the generation config's, else the model config's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
