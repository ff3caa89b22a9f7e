"""Generation with Hugging Face ``generate()`` (greedy, KV cache), timed and streamed, optionally with a static
KV cache and a ``torch.compile``d decode step.

Timing: a streamer timestamps every token ``generate`` hands it. The prompt time is from the call to the first
new token (prefill forward + first sampling step); the decode rate counts the tokens after the first over the
time from the first to the last. ``compile=True`` uses ``generate``'s own path: a `StaticCache` sized to a
bucket of `CACHE_BUCKET` tokens (so other prompt lengths reuse the compiled step) and ``torch.compile`` of the
model's forward for the one-token decode steps (the prefill stays eager). A compile failure falls back to eager
with one warning line. ``skip_module_guards`` drops dynamo's guards on nn.Module state, checked on every
step (python time per compiled SmolLM2 step 2.5 -> 1.2 ms); only for a process that compiles this one model
and never changes it.

Threads: on this 2-core VM, shared with other processes, libgomp's default active waiting (workers spin
after every parallel region) costs 5-10x at decode: Hugging Face fp32 alone (qgraph not imported) decodes
2.9 tok/s with the default policy and 15 tok/s with ``OMP_WAIT_POLICY=PASSIVE``; qgraph BCQ-3 3.4-4.3 vs 30-35.
libgomp reads the variable only when it loads (with torch), so entry points set it before importing torch:
bench/decode_llm.py, examples/smollm2_generate.py, and ``qgraph generate`` (which re-executes itself once).
"""
from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CACHE_BUCKET = 256


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
    """Greedy generation for one model + tokenizer, eager or with a compiled static-cache decode step."""

    def __init__(self, model: Any, tokenizer: Any, *, compile: bool = False, bucket: int = CACHE_BUCKET,
                 backend: Any = "inductor", skip_module_guards: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.compile, self.bucket, self.backend = compile, bucket, backend
        self.skip_module_guards = skip_module_guards
        self.compile_seconds: float | None = None
        self.compile_error: str | None = None

    def _kwargs(self, total: int) -> dict:
        if not self.compile:
            return {}
        from transformers import CompileConfig

        # Inductor's own kernels single-threaded: the decode glue is a few KB per op, and an OpenMP team per
        # fused kernel stalls whenever the other core is busy (measured: 17-28 ms of generated code per step
        # with 2 threads, 4-5 ms with 1, under load); BiQGEMM and attention keep torch's threads
        opts = {"cpp.threads": 1} if self.backend == "inductor" else {}
        if self.skip_module_guards:
            import torch

            opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        opts = opts or None
        # (torch.compile takes a mode or options, not both; no mode is Inductor's default mode)
        cc = CompileConfig(fullgraph=False, dynamic=False, mode=None if opts else "default", backend=self.backend,
                           options=opts)
        cc._compile_all_devices = True
        max_len = -(-total // self.bucket) * self.bucket
        return {"cache_implementation": "static", "compile_config": cc, "max_cache_len": max_len}

    def _run(self, ids, pad, kw: dict, max_new_tokens: int):
        import torch

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad,
                                       **kw, **self._kwargs(ids.shape[1] + max_new_tokens))

    def _give_up(self, e: Exception) -> None:
        """Run eager from now on, with one warning line naming the compiler's own error."""
        import torch

        root = getattr(e, "inner_exception", None) or e.__cause__ or e  # dynamo wraps the compiler's error
        first = (str(root).strip().splitlines() or [""])[0][:200]
        self.compile_error = f"{type(root).__name__}: {first}"
        print(f"qgraph: torch.compile of the decode step failed ({self.compile_error}); running eager",
              file=sys.stderr)
        self.compile = False
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
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    do_sample=False, **self._kwargs(prompt_tokens + max_new_tokens))
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
