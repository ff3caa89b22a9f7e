"""Layering: the IR, the quantizers and the kernels never import passes, the search or the CLI (node-metadata
keys live in `qgraph.ir.meta`, not in the passes that write them)."""
import ast
from pathlib import Path

import qgraph

ROOT = Path(qgraph.__file__).parent
LOWER_LAYERS = ("ir", "quant", "kernels")
UPPER = ("qgraph.passes", "qgraph.search", "qgraph.cli")


def _imports(path: Path) -> list[str]:
    package = "qgraph." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def test_ir_quant_and_kernels_import_no_passes_search_or_cli():
    bad = {}
    for layer in LOWER_LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            hits = sorted({m for m in _imports(path) if m.startswith(UPPER) or m in ("qgraph.passes", "qgraph.cli")})
            if hits:
                bad[str(path.relative_to(ROOT))] = hits
    assert not bad, f"lower layers import upper ones: {bad}"


def test_metadata_keys_have_one_home_and_the_old_names_still_work():
    from qgraph.ir import meta
    from qgraph.ir.graph_view import ANNOTATION_KEY, LOWERED_FROM_KEY
    from qgraph.lowering import LOWERED_FROM_KEY as LOWERED_FROM_KEY_2
    from qgraph.passes.calibrate import QPARAMS_KEY
    from qgraph.passes.fuse_activation import FUSED_INTO_KEY
    from qgraph.passes.insert_fq import FQ_KEY
    from qgraph.passes.lower_int8 import LOWERED_KEY
    from qgraph.passes.quantize_weights import QWEIGHT_KEY
    from qgraph.passes.sparq import SPARQ_KEY

    assert (ANNOTATION_KEY, QPARAMS_KEY, QWEIGHT_KEY, FQ_KEY, FUSED_INTO_KEY, LOWERED_KEY, SPARQ_KEY, LOWERED_FROM_KEY,
            LOWERED_FROM_KEY_2) == (meta.ANNOTATION_KEY, meta.QPARAMS_KEY, meta.QWEIGHT_KEY, meta.FQ_KEY,
                                    meta.FUSED_INTO_KEY, meta.LOWERED_KEY, meta.SPARQ_KEY, meta.LOWERED_FROM_KEY,
                                    meta.LOWERED_FROM_KEY)
    values = [getattr(meta, k) for k in meta.__all__]
    assert len(set(values)) == len(values) and all(v.startswith("qgraph.") for v in values)
    passes_dir = Path(qgraph.passes.__file__).parent
    defined = [(p.name, line) for p in passes_dir.glob("*.py") for line in p.read_text().splitlines()
               if line.split("=")[0].strip().endswith("_KEY") and '= "qgraph.' in line]
    assert defined == []  # a new key goes into qgraph.ir.meta


def test_no_pass_imports_private_names_of_another_pass():
    """Shared pieces are public (in qgraph/quant, or a pass's public names); aespa once took gptq's privates."""
    passes_dir = Path(qgraph.passes.__file__).parent
    bad = []
    for path in sorted(passes_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qgraph.passes."):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []
