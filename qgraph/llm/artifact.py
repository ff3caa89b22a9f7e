"""A quantized causal LM as an artifact folder of data only, and its loader.

Folder layout::

    manifest.json         format, source, fingerprint of config.json, recipe, per quantized module its kind
                          and geometry, which embedding reads which head's table, stored bytes, SHA-256 of
                          every other file
    config.json           the model's Hugging Face config (built-in architectures only)
    weights.safetensors   quantized modules under "<module path>." (BCQ: planes, alpha[, offset]; uniform: codes
                          as bit-planes, scale, zero_point), every other parameter and buffer under "float.<name>"
    tokenizer/            the tokenizer's own files (tokenizer.json, tokenizer_config.json, ...)

Loading never runs code from the folder: the manifest is JSON, tensors come from safetensors, the model class is
transformers' built-in class for ``config.json``'s ``model_type`` (``trust_remote_code=False``; an ``auto_map``
is refused), built on the meta device, its quantized modules swapped for BiQGEMM ones and every other tensor
filled from the file; a tensor left unfilled, a hash, shape or dtype that does not match is an `ExportError`.
The model is never calibrated again. `read_lm_artifact` is the one place that reads and verifies the files.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qgraph.artifact import sha256_file
from qgraph.atomic import atomic_folder
from qgraph.errors import ExportError, SpecError
from qgraph.llm.modules import fuse_shared_inputs
from qgraph.llm.quantize import LMWeights, module_names
from qgraph.llm.recipe import LMRecipe
from qgraph.quant.bcq_weight import BCQWeight, pack_signs, unpack_signs
from qgraph.quant.block_scaled import BlockScaledWeight
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight

FORMAT = "qgraph.lm/1"
MANIFEST, CONFIG, WEIGHTS, TOKENIZER = "manifest.json", "config.json", "weights.safetensors", "tokenizer"
FLOAT = "float."
_MAKE = "make one with: qgraph lower MODEL --scheme bcq --bits 3 --out DIR (or qgraph quantize-lm)"
# config keys that do not change the network (left out of the fingerprint)
_VOLATILE = {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
             "quantization_config", "use_cache", "auto_map", "_commit_hash", "_attn_implementation_autoset",
             "output_attentions", "output_hidden_states", "return_dict"}


# ------------------------------------------------------------------------------------------ helpers
def config_dict(config: Any) -> dict:
    """A HF config as a plain JSON-able dict (no quantization_config / auto_map)."""
    d = json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else dict(config)
    for key in ("quantization_config", "auto_map"):
        d.pop(key, None)
    return d


def fingerprint(config: Any) -> str:
    """SHA-256 of the config fields that define the network (model type, sizes, vocabulary, RoPE, ...)."""
    if isinstance(config, dict):  # through the built-in config class, so defaults left out of a file count
        config = builtin_causal_lm(config)[1]
    d = config_dict(config)
    keep = {k: v for k, v in sorted(d.items()) if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _uniform_tensors(q: UniformWeight, prefix: str) -> dict[str, torch.Tensor]:
    u = (q.codes.to(torch.int32) - q.spec.qmin).to(torch.uint8)
    planes = torch.stack([(u >> i) & 1 for i in range(q.spec.bits)])
    zdt = torch.int8 if q.spec.signed else torch.uint8
    out = {prefix + "codes": pack_signs(planes), prefix + "scale": q.scale.to(torch.float32)}
    if not q.spec.symmetric:
        out[prefix + "zero_point"] = q.zero_point.to(zdt)
    return out


def _uniform_as_bcq(entry: dict, tensors: dict, prefix: str) -> BCQWeight:
    """The exact BCQ form of a stored uniform weight, straight from its stored bit-planes (they are BCQ planes:
    bit i of ``c − qmin``, 1 ↔ +1); see `qgraph.llm.modules.uniform_to_bcq`. No codes are unpacked."""
    spec = QSpec.from_dict(entry["spec"])
    m, k = entry["shape"]
    scale = tensors[prefix + "scale"].to(torch.float32)
    zp = tensors.get(prefix + "zero_point")
    if spec.granularity == "group":
        gs, scale = spec.group_size, scale.reshape(m, -1)
    else:
        gs, scale = k, scale.reshape(-1, 1).expand(m, 1)
    zp = torch.zeros_like(scale) if zp is None else zp.to(torch.float32).reshape(scale.shape)
    b = spec.bits
    alpha = torch.stack([scale * float(2 ** (i - 1)) for i in range(b)])
    offset = scale * ((2 ** b - 1) / 2 + spec.qmin - zp)
    return BCQWeight(tensors[prefix + "codes"], alpha.contiguous(), offset.contiguous(), (m, k), gs)


def _uniform_from(entry: dict, tensors: dict, prefix: str) -> UniformWeight:
    spec = QSpec.from_dict(entry["spec"])
    m, k = entry["shape"]
    planes = unpack_signs(tensors[prefix + "codes"], k)  # ±1 per bit
    if tuple(planes.shape) != (spec.bits, m, k):
        raise ExportError(f"{prefix}codes holds {tuple(planes.shape)} bit-planes, expected {(spec.bits, m, k)}")
    u = sum(((planes[i] > 0).to(torch.int32) << i) for i in range(spec.bits))
    codes = (u + spec.qmin).to(torch.int8 if spec.signed else torch.uint8)
    scale = tensors[prefix + "scale"]
    zp = tensors.get(prefix + "zero_point")
    zp = torch.zeros_like(scale, dtype=torch.int32) if zp is None else zp.to(torch.int32)
    return UniformWeight(codes, scale, zp, spec)


# ------------------------------------------------------------------------------------------ save
def save_lm(folder: str | Path, model: nn.Module, lw: LMWeights, tokenizer: Any = None, *,
            source: str | None = None) -> Path:
    """Write ``lw`` (quantized weights of the float HF model ``model``) with every other tensor of ``model``,
    its config and ``tokenizer`` into ``folder`` (replaced atomically: written beside it, then swapped in)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    emb_name, head_name, _ = module_names(model)
    quantized = set(lw.weights) | set(lw.tied)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, q in lw.weights.items():
        prefix = name + "."
        if isinstance(q, BCQWeight):
            modules[name] = {"kind": "bcq", **q.manifest()}
            tensors.update(q.tensors(prefix))
        elif isinstance(q, UniformWeight):
            modules[name] = {"kind": "uniform", "shape": list(q.shape), "spec": q.spec.to_dict()}
            tensors.update(_uniform_tensors(q, prefix))
        elif isinstance(q, BlockScaledWeight):
            modules[name] = {"kind": "block_scaled", "shape": list(q.shape), "spec": q.spec.to_dict()}
            tensors.update(q.tensors(prefix))
        else:
            raise ExportError(f"cannot store a {type(q).__name__} for {name}")
    first: dict[int, str] = {}
    floats, aliases = [], {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf == "weight":
            continue
        if id(t) in first:  # a tied float tensor is stored once
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        tensors[FLOAT + name] = t.detach()
        floats.append(name)
    cfg = config_dict(model.config)
    stored = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    linear = sum(b for k, b in stored.items() if k.rpartition(".")[0] in lw.weights
                 and k.rpartition(".")[0] not in (head_name, emb_name))
    linear_weights = sum(int(torch.Size(modules[n]["shape"]).numel()) for n in lw.weights
                         if n not in (head_name, emb_name))
    manifest = {
        "format": FORMAT, "source": source, "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"), "fingerprint": fingerprint(cfg),
        "recipe": lw.recipe.to_dict() if lw.recipe else None, "modules": modules, "tied": dict(lw.tied),
        "float_tensors": floats, "aliases": aliases,
        "bytes": {"total": sum(stored.values()), "quantized": sum(b for k, b in stored.items()
                                                                  if not k.startswith(FLOAT)),
                  "decoder_linears": linear, "decoder_linear_weights": linear_weights},
    }
    with atomic_folder(folder) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS), {"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


# ------------------------------------------------------------------------------------------ read
def read_lm_artifact(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of an artifact folder, after checking its format and every file's SHA-256.

    The one function that reads the files (to be replaced by ``qgraph.artifact.read_artifact``)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; give the artifact folder that holds {MANIFEST}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        hint = (" (its model/ is a lowered graph, which does not generate)" if (folder / "model" / MANIFEST).is_file()
                else "")
        raise ExportError(f"{folder} is not a qgraph LM artifact: {MANIFEST} is missing{hint}; {_MAKE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ExportError(f"{folder}/{MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{folder}/{MANIFEST}: not a qgraph LM artifact (format {got!r}, expected {FORMAT!r}); "
                          f"{_MAKE}")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files or CONFIG not in files:
        raise ExportError(f"{folder}/{MANIFEST}: 'files' must list {WEIGHTS} and {CONFIG} with their SHA-256")
    for rel, digest in files.items():
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            raise ExportError(f"{folder}/{MANIFEST}: file {rel!r} lies outside the artifact folder")
        if not path.is_file():
            raise ExportError(f"{folder}: {rel} is missing")
        if sha256_file(path) != digest:
            raise ExportError(f"{folder}: {rel} does not match its SHA-256 in {MANIFEST} (changed or corrupt)")
    for key, kind in (("modules", dict), ("tied", dict), ("float_tensors", list), ("fingerprint", str)):
        if not isinstance(manifest.get(key), kind):
            raise ExportError(f"{folder}/{MANIFEST}: field {key!r} must be a {kind.__name__}")
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:
        raise ExportError(f"{folder}/{WEIGHTS} cannot be read: {e}") from None
    return manifest, tensors


def read_config(folder: str | Path) -> dict:
    """config.json of an artifact or model folder, as a dict."""
    path = Path(folder) / CONFIG
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} has no {CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ExportError(f"{path} must hold a JSON object")
    return d


# ------------------------------------------------------------------------------------------ load
def builtin_causal_lm(config: dict) -> tuple[type, Any]:
    """(transformers' built-in causal-LM class, its config object) for a config dict; never remote code."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "auto_map" in config:
        raise ExportError("config.json names custom code (auto_map); only transformers' built-in architectures load")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"config.json has model_type {model_type!r}, which is not a built-in transformers "
                          f"causal LM")
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if cls is None or not cls.__module__.startswith("transformers."):
        raise ExportError(f"transformers has no built-in causal-LM class for {model_type!r}")
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as e:
        raise ExportError(f"config.json does not describe a valid {model_type} model: {e}") from None
    return cls, cfg


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ExportError(f"artifact tensor {name} has shape {tuple(value.shape)}, the model wants "
                              f"{tuple(old.shape)}")
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        old = mod._buffers[leaf]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ExportError(f"artifact tensor {name} has shape {tuple(value.shape)}, the model wants "
                              f"{tuple(old.shape)}")
        mod._buffers[leaf] = value
    else:
        raise ExportError(f"artifact tensor {name} is not a parameter or buffer of the model")


def lm_weights_from(manifest: dict, tensors: dict[str, torch.Tensor], *, kernel_form: bool = False) -> LMWeights:
    """The `LMWeights` an artifact holds (``kernel_form``: uniform weights as their exact BCQ form, read
    straight from the stored bit-planes, which is all the BiQGEMM modules need)."""
    weights: dict[str, Any] = {}
    for name, entry in manifest["modules"].items():
        if not isinstance(entry, dict):
            raise ExportError(f"manifest module {name!r} must be an object")
        try:
            if entry.get("kind") == "bcq":
                q = BCQWeight.from_parts(entry, tensors, prefix=name + ".")
            elif entry.get("kind") == "uniform":
                q = (_uniform_as_bcq if kernel_form else _uniform_from)(entry, tensors, name + ".")
            elif entry.get("kind") == "block_scaled":
                q = BlockScaledWeight.from_tensors(QSpec.from_dict(entry["spec"]), tuple(entry["shape"]), tensors,
                                                   name + ".")
            else:
                raise ExportError(f"manifest module {name!r} has unknown kind {entry.get('kind')!r}")
        except (SpecError, KeyError, TypeError, ValueError) as e:
            raise ExportError(f"artifact module {name!r} is malformed: {e}") from None
        for t in (getattr(q, "alpha", None), getattr(q, "offset", None), getattr(q, "scale", None),
                  getattr(q, "super_scale", None), getattr(q, "super_min", None)):
            if t is not None and not torch.isfinite(t).all():
                raise ExportError(f"artifact module {name!r} has non-finite scales")
        weights[name] = q
    for emb, head in manifest["tied"].items():
        if head not in weights:
            raise ExportError(f"manifest ties {emb!r} to {head!r}, which holds no quantized table")
    recipe = LMRecipe.from_dict(manifest["recipe"]) if manifest.get("recipe") else None
    return LMWeights(weights, dict(manifest["tied"]), recipe)


def load_lm(folder: str | Path, *, mode: str = "exact", head_mode: str | None = None,
            tokenizer: bool = True, fuse: bool = True) -> tuple[nn.Module, Any, dict]:
    """(generating model on BiQGEMM, tokenizer or None, manifest) from an artifact folder.

    ``fuse``: sibling Linears that read one input (q/k/v, gate/up) run as one BiQGEMM call
    (`qgraph.llm.modules.fuse_shared_inputs`)."""
    from qgraph.llm.quantize import apply_weights

    folder = Path(folder)
    manifest, tensors = read_lm_artifact(folder)
    config = read_config(folder)
    if fingerprint(config) != manifest["fingerprint"]:
        raise ExportError(f"{folder}/{CONFIG} does not match the manifest's fingerprint")
    cls, cfg = builtin_causal_lm(config)
    lw = lm_weights_from(manifest, tensors, kernel_form=True)
    with torch.device("meta"):
        model = cls(cfg)
    for name in lw.weights:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"the artifact quantizes {name!r}, which the {cls.__name__} has not") from None
        want = tuple(mod.weight.shape)
        if tuple(lw.weights[name].shape) != want:
            raise ExportError(f"artifact module {name!r} has shape {tuple(lw.weights[name].shape)}; the model "
                              f"built from config.json wants {want}")
    apply_weights(model, lw, mode=mode, head_mode=head_mode)
    for name in manifest["float_tensors"]:
        key = FLOAT + name
        if key not in tensors:
            raise ExportError(f"{folder}/{WEIGHTS} lacks {key}")
        _set_tensor(model, name, tensors[key])
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict) or any(v not in manifest["float_tensors"] for v in aliases.values()):
        raise ExportError(f"{folder}/{MANIFEST}: 'aliases' must map tensor names to stored float tensors")
    for name, target in aliases.items():
        _set_tensor(model, name, tensors[FLOAT + target])
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ExportError(f"the artifact leaves {len(left)} tensor(s) of the model unset, e.g. {left[0]}")
    if fuse:
        fuse_shared_inputs(model)
    model.eval()
    tok = None
    if tokenizer and (folder / TOKENIZER).is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder / TOKENIZER), trust_remote_code=False,
                                            local_files_only=True)
    return model, tok, manifest
