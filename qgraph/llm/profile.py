"""Where a decode step's time goes: torch.profiler over ``generate()``, split by op.

Categories (milliseconds per decode step, averaged over the profiled steps):
- ``kernel``: ``qgraph::biqgemm`` (BiQGEMM, including its Python validation and ctypes call) and any dense
  GEMM left (``aten::mm`` / ``addmm`` / ``linear`` of float or int8 layers);
- ``attention``: ``scaled_dot_product_attention`` and its kernels, ``qgraph::decode_attention``;
- ``other ops``: every other op inside the model forward (norms, RoPE, embedding gather, cache writes);
- ``compiled code``: Inductor's generated kernels of a compiled decode step (the compiled graph's own time);
- ``python``: forward wall time not spent in any op (module calls, HF glue, dynamo guards);
- ``sampling + loop``: the loop's own work outside the forward: ``generate()``'s (logits slice, argmax, stopping
  criteria, cache bookkeeping, streaming) when eager, qgraph's static-cache loop's when compiled (its argmax is
  inside the compiled step).

A native decode step (``gen.native``, `qgraph.llm.native_decode`) is timed by the step itself, with the same
categories: BiQGEMM and float Linears (``kernel``), rotary embedding + cache write + attention (``attention``),
embedding, norms, SiLU gate and residuals (``other ops``), the argmax (``sampling + loop``, with the loop's own
Python time), and nothing compiled.
"""
from __future__ import annotations

from typing import Any

FORWARD = "qgraph.forward"
KERNEL_OPS = ("qgraph::biqgemm", "aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "quantized::linear_dynamic",
              "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "qgraph::int8_weight_only_linear")


def _category(name: str) -> str:
    if name in KERNEL_OPS or name.startswith("quantized::linear"):
        return "kernel"
    if "scaled_dot_product" in name or "flash_attention" in name or name == "qgraph::decode_attention":
        return "attention"
    return "other ops"


def profile_decode(gen: Any, prompt, steps: int = 16) -> dict[str, float]:
    """Per-decode-step milliseconds by category (see the module doc) for a `qgraph.llm.runtime.Generator`,
    over the ``steps`` one-token forwards of a greedy ``generate`` (the prefill forward is left out; the loop
    time is the decode wall time, first to last token, minus those forwards)."""
    if getattr(gen, "native", None) is not None:
        return _profile_native(gen, prompt, steps)
    from torch.profiler import ProfilerActivity, profile, record_function

    model = gen.model
    gen.warmup()
    compiled = gen.compile and gen._step is not None
    owner, attr = (gen, "_step") if compiled else (model, "forward")
    inner = getattr(owner, attr)

    def timed(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        label = FORWARD if ids is not None and ids.shape[-1] == 1 else FORWARD + ".prefill"
        with record_function(label):
            return inner(*args, **kwargs)

    setattr(owner, attr, timed)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            res = gen.generate(prompt, steps + 1, stop_at_eos=False)
    finally:
        if compiled:
            gen._step = inner
        else:
            del model.forward  # the instance attribute; the class method is back
    fwd = [e for e in prof.events() if e.name == FORWARD]
    totals = {"kernel": 0.0, "attention": 0.0, "other ops": 0.0, "compiled code": 0.0}
    for e in fwd:
        for c in e.cpu_children:
            _walk(c, totals)
    fwd_wall = sum(e.cpu_time_total for e in fwd)
    totals["python"] = max(0.0, fwd_wall - sum(totals.values()))
    totals["sampling + loop"] = max(0.0, res.decode_seconds * 1e6 - fwd_wall)
    n = max(1, len(fwd))
    per = {k: v / n / 1e3 for k, v in totals.items()}
    per["step"] = sum(per.values())
    per["steps"] = len(fwd)
    return per


def _profile_native(gen: Any, prompt, steps: int) -> dict[str, float]:
    plan = gen.native.plan
    plan.reset_timings()
    res = gen.generate(prompt, steps + 1, stop_at_eos=False)
    kernel, attention, other, argmax, n = plan.timings()
    n = max(1.0, n)
    ms = {"kernel": kernel, "attention": attention, "other ops": other, "compiled code": 0.0}
    per = {k: v / n * 1e3 for k, v in ms.items()}
    per["python"] = 0.0  # the native step has no Python inside; the loop's own time is below
    loop = res.decode_seconds - (kernel + attention + other + argmax)
    per["sampling + loop"] = (argmax + max(0.0, loop)) / n * 1e3
    per["step"] = sum(per.values())
    per["steps"] = int(n)
    return per


_WRAPPERS = ("Torch-Compiled Region", "## Call CompiledFxGraph", "Pregraph bytecode", "AOTDispatcher",
             "TorchDynamo Cache Lookup", "CompiledFunction")


def _walk(e: Any, totals: dict[str, float]) -> None:
    """Add an event's time to its category; compiled-code wrappers are looked through (their own time: the
    generated kernels for the compiled graph, guard checks and wrapper code for the rest, left to python)."""
    if e.name.startswith(_WRAPPERS):
        children = sum(c.cpu_time_total for c in e.cpu_children)
        if "CompiledFxGraph" in e.name:
            totals["compiled code"] += max(0.0, e.cpu_time_total - children)
        for c in e.cpu_children:
            _walk(c, totals)
        return
    totals[_category(e.name)] += e.cpu_time_total
