"""Where the CLI gets models and calibration data: bundled names, ``file.py:factory``, tensor files,
text files and image folders."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qgraph.errors import CalibrationError, ModelLoadError


@dataclass
class ModelSource:
    """A model ready to trace: the module, example inputs, default calibration batches, tokenizer."""

    name: str
    module: nn.Module
    example_inputs: tuple
    calibration: list[tuple] | None
    dynamic_shapes: Any = None
    tokenizer: Any = None
    kind: str = "generic"  # "text", "image" or "generic": how to read a --calib path
    onnx_path: str | None = None  # set for ONNX models (then ``module`` is None)


def load_model_source(spec: str, *, calib_batches: int = 8) -> ModelSource:
    """``minilm`` / ``smollm2`` / ``mobilenetv2``, or ``path/to/file.py:factory``.

    A factory returns a module (with an ``example_inputs`` attribute) or a ``(module, example_inputs)`` pair.
    """
    from qgraph.models.registry import BUNDLED

    if spec.endswith(".onnx"):
        return _from_onnx(Path(spec))
    if Path(spec).is_dir():
        return _from_hf_dir(Path(spec), calib_batches)
    if spec in BUNDLED:
        b = BUNDLED[spec]
        if not b.available():
            raise ModelLoadError(f"bundled model {spec!r} needs packages that are not installed: {b.install}")
        loaded = b.load()
        kind = {"minilm": "text", "smollm2": "text", "mobilenetv2": "image"}.get(spec, "generic")
        return ModelSource(spec, loaded.module, b.example_inputs(loaded), b.calibration_batches(loaded, calib_batches),
                           b.dynamic_shapes(), loaded.tokenizer, kind)
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, factory = spec.split(":", 1)
        return _from_factory(Path(path), factory)
    if spec.endswith(".py"):
        raise ModelLoadError(f"{spec}: name the factory function too, as {spec}:make_model")
    raise ModelLoadError(f"unknown model {spec!r}: use a bundled name ({', '.join(sorted(BUNDLED))}), "
                         f"path/to/file.py:factory, a model.onnx file or a Hugging Face model folder")


def _from_onnx(path: Path) -> ModelSource:
    from qgraph.ir.onnx import example_inputs_for, load_onnx

    graph = load_onnx(path)
    return ModelSource(path.stem, None, example_inputs_for(graph), None, onnx_path=str(path))


def _from_hf_dir(path: Path, calib_batches: int) -> ModelSource:
    """A local Hugging Face model folder: causal LMs give logits, other encoders mean-pooled embeddings."""
    import json

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} is a folder but not a Hugging Face model (no config.json)")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("loading a Hugging Face folder needs transformers: pip install 'qgraph[models]'") from None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_file} must hold a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise ModelLoadError(f"{cfg_file}: 'architectures' must be a list of class names")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if any(a.endswith("ForCausalLM") for a in archs):
            from qgraph.models.smollm2 import CausalLMLogits

            module = CausalLMLogits(transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, trust_remote_code=False))
        else:
            from qgraph.models.minilm import MiniLMEmbedder

            module = MiniLMEmbedder(transformers.AutoModel.from_pretrained(
                path, local_files_only=True, trust_remote_code=False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path}: transformers could not load it: {type(e).__name__}: {first}") from None
    from qgraph.data.text import calibration_plays, sentences

    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    source = ModelSource(path.name, module.eval(), (), None, tokenizer=tok, kind="text")
    lines = sentences(calibration_plays(), 8 * calib_batches, seed=0)
    source.calibration = [_encode_text(source, lines[i:i + 8]) for i in range(0, len(lines), 8)]
    source.example_inputs = source.calibration[0]
    return source


def _from_factory(path: Path, factory: str) -> ModelSource:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    mod_name = f"qgraph_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ModelLoadError(f"{path}: importing it failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ModelLoadError(f"{path} has no function {factory!r}")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - user code: any failure is a model-loading error
        raise ModelLoadError(f"{path}:{factory} raised {type(e).__name__}: {e}") from None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        model, example = out
    elif isinstance(out, nn.Module) and hasattr(out, "example_inputs"):
        model, example = out, out.example_inputs
    else:
        raise ModelLoadError(f"{path}:{factory} must return (model, example_inputs) or a module with an "
                             f"example_inputs attribute")
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    return ModelSource(f"{path.stem}:{factory}", model.eval(), example, None)


def load_calibration(path: str, source: ModelSource, *, batch_size: int = 8, max_batches: int = 16) -> list[tuple]:
    """Calibration batches from a ``.pt``/``.npy`` tensor file, a text file or an image folder."""
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"calibration data {path} does not exist")
    if p.is_dir():
        if source.kind != "image":
            raise CalibrationError(f"{path} is a folder of images but {source.name} does not take images")
        from qgraph.data.images import load_image_folder

        imgs = load_image_folder(p)
        return [(imgs[i:i + batch_size],) for i in range(0, len(imgs), batch_size)][:max_batches]
    if p.suffix in (".pt", ".pth"):
        try:
            data = torch.load(p, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch.load raises many types on a bad file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CalibrationError(f"{path} is not a tensor file torch can load safely: {first}") from None
        return _tensor_batches(data, batch_size, max_batches, path)
    if p.suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CalibrationError(f"{path} is not a plain numeric .npy array: {e}") from None
        if arr.dtype.kind not in "biuf":
            raise CalibrationError(f"{path} holds {arr.dtype} values; calibration data must be numeric")
        return _tensor_batches(torch.from_numpy(arr), batch_size, max_batches, path)
    if p.suffix in (".txt", ".text", ".md"):
        if source.tokenizer is None or source.kind != "text":
            raise CalibrationError(f"{path} is a text file but {source.name} does not take text")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if sum(ch.isprintable() or ch.isspace() for ch in text) < 0.95 * len(text):
            raise CalibrationError(f"{path} is mostly unprintable characters: give a plain text file")
        lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 3]
        if not lines:
            raise CalibrationError(f"{path} has no lines of text to calibrate with")
        return [_encode_text(source, lines[i:i + batch_size]) for i in range(0, len(lines), batch_size)][:max_batches]
    raise CalibrationError(f"cannot read calibration data {path}: use a .pt/.npy tensor file, a .txt file or an "
                           f"image folder")


def _encode_text(source: ModelSource, lines: list[str]) -> tuple:
    enc = source.tokenizer(lines, padding=True, truncation=True, max_length=128, return_tensors="pt")
    if source.name == "minilm" or type(source.module).__name__ == "MiniLMEmbedder":
        return enc["input_ids"], enc["attention_mask"]
    return (enc["input_ids"],)


def _tensor_batches(data: Any, batch_size: int, max_batches: int, path: str) -> list[tuple]:
    for t in (data,) if isinstance(data, torch.Tensor) else data if isinstance(data, (list, tuple)) else ():
        for x in (t,) if isinstance(t, torch.Tensor) else t if isinstance(t, (list, tuple)) else ():
            if isinstance(x, torch.Tensor) and x.dtype in (torch.float64, torch.complex64, torch.complex128):
                raise CalibrationError(f"{path} holds {x.dtype} tensors: save them as float32 (x.float())")
    if isinstance(data, torch.Tensor):
        return [(data[i:i + batch_size],) for i in range(0, len(data), batch_size)][:max_batches]
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, (torch.Tensor, tuple, list)) for b in data):
        return [b if isinstance(b, tuple) else (b,) if isinstance(b, torch.Tensor) else tuple(b)
                for b in data][:max_batches]
    raise CalibrationError(f"{path} must hold a tensor (split into batches along dim 0) or a list of batches")
