"""Running a lowered graph without per-node Python overhead: ``torch.compile`` of the lowered module.

The lowered fx graph runs node by node in Python when called eagerly. `compile_lowered` hands it to
``torch.compile`` (Inductor on CPU; qgraph's custom ops ``qgraph::biqgemm`` / ``int8_linear`` /
``int8_conv2d`` have fake kernels, so they stay single calls inside the generated code and the float
glue between them becomes fused C++). ``mode``:

- ``"off"`` (``False``): eager;
- ``"on"`` (``True``): compile;
- ``"auto"``: compile, then time eager against compiled on the example inputs (interleaved rounds,
  medians) and keep the faster.

The result goes to ``report["compile"]``: what was asked, what is used, the compile seconds and, when
measured, both latencies. A compile failure falls back to eager with one `CompileFallbackWarning`.

Compiled code is never stored: the compiled callable lives beside the lowered ``GraphModule`` (which is
what artifacts export), rebuilt in each process; Inductor's own cache (outside any artifact folder, keyed by
content hashes of the graph) makes a rebuild of the same graph fast.
"""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

MODES = ("off", "on", "auto")


class CompileFallbackWarning(RuntimeWarning):
    """``torch.compile`` of a lowered graph failed; the model runs eagerly."""


def normalize_mode(mode: bool | str | None) -> str:
    """``True``/``False``/``None`` or ``"on"``/``"off"``/``"auto"`` → one of `MODES`."""
    from qgraph.errors import OptionError

    if mode is None or mode is False:
        return "off"
    if mode is True:
        return "on"
    if isinstance(mode, str) and mode.lower() in MODES:
        return mode.lower()
    raise OptionError(f"compile must be True, False, 'on', 'off' or 'auto', got {mode!r}")


def first_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``; a compiler error wrapping another (Dynamo's BackendCompilerFailed)
    names the inner one, whose message says what went wrong."""
    inner = getattr(e, "inner_exception", None) or (e.__cause__ if type(e).__name__ == "BackendCompilerFailed"
                                                    else None)
    if isinstance(inner, BaseException):
        return f"{type(e).__name__}: {first_line(inner, limit)}"
    text = (str(e).strip().splitlines() or [""])[0].strip()
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def _quiet_compile_logs():
    """Dynamo logs a failed compile's traceback at ERROR level before raising; the fallback warning says it."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def ctx():
        names = ("torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes")
        loggers = [logging.getLogger(n) for n in names]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)

    return ctx()


def _raise_recompile_limits() -> None:
    # every lowered module is its own compiled frame; benches compile several models and shapes per process
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)


def _kinds(args: tuple) -> tuple:
    return tuple((a.dtype, a.device.type, a.dim()) if isinstance(a, torch.Tensor) else type(a) for a in args)


class CompiledCall:
    """A compiled lowered module, called under ``torch.no_grad()`` (one set of guards for inference).

    Inputs of another dtype, device or rank than the example inputs run eagerly (the eager kernels check
    them and raise typed errors; recompiling for them would not pay). A failure at a later call (a
    recompile for a new shape that the compiler cannot handle) drops the compiled code and runs eager from
    then on, with one `CompileFallbackWarning`; an error the eager module raises as well propagates.
    """

    def __init__(self, module: torch.nn.Module, compiled: Callable, backend: str, example_inputs: tuple):
        self.module, self.compiled, self.backend = module, compiled, backend
        self.kinds = _kinds(tuple(example_inputs))
        self.failed: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None or _kinds(args) != self.kinds:
            return self.module(*args)
        try:
            with torch.no_grad():
                return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - decide by running eager: a bad input fails there too
            out = self.module(*args)
            self.failed = first_line(e)
            self.compiled = None
            warnings.warn(f"qgraph: torch.compile of the lowered graph failed ({self.failed}); running eager",
                          CompileFallbackWarning, stacklevel=2)
            return out


def compile_module(module: torch.nn.Module, example_inputs: tuple, *, backend: str | Callable = "inductor",
                   dynamic: bool | None = None) -> tuple[CompiledCall | None, float, str | None]:
    """``torch.compile(module)`` and one call on ``example_inputs`` (compilation is lazy): (the compiled
    call, seconds, None), or (None, seconds, the first line of the error) after one `CompileFallbackWarning`."""
    _raise_recompile_limits()
    start = time.perf_counter()
    try:
        with _quiet_compile_logs():
            compiled = torch.compile(module, backend=backend, dynamic=dynamic)
            with torch.no_grad():
                compiled(*example_inputs)
    except Exception as e:  # noqa: BLE001 - any compiler failure: run eager
        seconds = time.perf_counter() - start
        err = first_line(e)
        warnings.warn(f"qgraph: torch.compile of the lowered graph failed ({err}); running eager",
                      CompileFallbackWarning, stacklevel=2)
        return None, seconds, err
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
    return CompiledCall(module, compiled, name, example_inputs), time.perf_counter() - start, None


def interleaved_seconds(fns: dict[str, Callable], inputs: tuple, *, rounds: int = 10, warmup: int = 1,
                        budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of each callable on ``inputs``, in interleaved rounds (each round calls every one
    once, so background load hits them alike). ``budget_s`` stops early (after at least 3 rounds) once the
    rounds so far add up to it."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for _ in range(warmup):
                f(*inputs)
        spent = 0.0
        for r in range(rounds):
            for k, f in fns.items():
                t = time.perf_counter()
                f(*inputs)
                dt = time.perf_counter() - t
                times[k].append(dt)
                spent += dt
            if budget_s is not None and r >= 2 and spent > budget_s:
                break
    return times


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def compile_lowered(module: torch.nn.Module, example_inputs: tuple | None, mode: bool | str = "auto", *,
                    measure: bool = True, backend: str | Callable = "inductor",
                    rounds: int = 10) -> tuple[CompiledCall | None, dict[str, Any]]:
    """Compile ``module`` as ``mode`` asks: (the compiled call to use or None for eager, the report entry).

    ``"auto"`` times eager against compiled on the example inputs, so it needs ``measure`` (and example
    inputs): without them it stays eager, compiles nothing and says why. ``"on"`` compiles without timing.
    """
    mode = normalize_mode(mode)
    info: dict[str, Any] = {"requested": mode, "used": "eager", "backend": backend if isinstance(backend, str)
                            else getattr(backend, "__name__", "custom"),
                            "seconds": None, "eager_ms": None, "compiled_ms": None, "error": None, "note": ""}
    if mode == "off":
        info["note"] = "not requested"
        return None, info
    if not example_inputs:
        info["note"] = "no example inputs to compile with"
        return None, info
    if mode == "auto" and not measure:
        info["note"] = "auto needs a measurement (timing is off): running eager"
        return None, info
    call, seconds, err = compile_module(module, tuple(example_inputs), backend=backend)
    info["seconds"], info["error"] = round(seconds, 3), err
    if call is None:
        info["note"] = "compile failed: running eager"
        return None, info
    if mode == "auto":
        med = medians_ms(interleaved_seconds({"eager": module, "compiled": call}, tuple(example_inputs),
                                             rounds=rounds, budget_s=20.0))
        info["eager_ms"], info["compiled_ms"] = med["eager"], med["compiled"]
        if call.failed is not None:  # failed while being timed: eager from here on
            info["error"], info["note"] = call.failed, "compile failed: running eager"
            return None, info
        if med["compiled"] >= med["eager"]:
            info["note"] = "compiled was not faster on the example inputs: running eager"
            return None, info
    info["used"] = "compiled"
    info["note"] = "faster on the example inputs" if mode == "auto" else "requested"
    return call, info
