"""Target specs: every shipped TOML loads; malformed TOMLs give typed errors naming file and key."""
import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph import TargetError, list_targets, load_target
from qgraph.quant.qspec import QSpec

SHIPPED = ["generic", "x86-avx2", "x86-avx512-vnni", "arm-neon", "gpu-sm90", "npu-int8"]


def test_all_expected_targets_ship():
    assert set(SHIPPED) <= set(list_targets())


@pytest.mark.parametrize("name", list_targets())
def test_every_shipped_target_loads_and_is_consistent(name):
    t = load_target(name)
    assert t.name == name
    assert t.cost.memory_bandwidth_gbps > 0 and t.cost.macs_per_second["fp32"] > 0
    assert t.cost.sources, "each target says where its cost figures come from"
    assert t.check("Gemm", t.defaults.weight, t.defaults.activation) == []
    assert t.kernel_for("Gemm", t.defaults.weight, t.defaults.activation) == "int8_gemm"


def test_inheritance_overrides_and_keeps():
    base, child = load_target("generic"), load_target("x86-avx2")
    assert child.kernels == base.kernels and child.defaults.weight == base.defaults.weight
    assert child.defaults.activation.bits == 7 and base.defaults.activation.bits == 8  # overridden: no VNNI
    assert child.cost.memory_bandwidth_gbps != base.cost.memory_bandwidth_gbps


def test_npu_rejects_bcq_and_per_channel():
    npu = load_target("npu-int8")
    assert not npu.supports_bcq
    assert npu.check("Gemm", QSpec.bcq(3, 128), None) == ["target npu-int8 has no binary-coding (BCQ) kernels"]
    reasons = npu.check("Gemm", QSpec.parse("int8/channel/sym"), npu.defaults.activation)
    assert any("granularity 'channel'" in r for r in reasons) and any("powers of two" in r for r in reasons)
    assert load_target("x86-avx2").kernel_for("Gemm", QSpec.bcq(3, 128), None) == "biqgemm"


def test_user_toml_path_and_unknown_name(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('inherits = "x86-avx2"\nname = "mine"\n[cost]\ncall_overhead_us = 1.0\n')
    t = load_target(str(p))
    assert t.name == "mine" and t.cost.call_overhead_us == 1.0
    with pytest.raises(TargetError, match="unknown target 'x86-avx3'.*x86-avx2"):
        load_target("x86-avx3")


def _shipped_raw():
    from importlib.resources import files
    return tomllib.loads((files("qgraph.targets") / "npu-int8.toml").read_text())


def _toml_value(v):
    import json
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _dump(d):
    """A small TOML writer for the shapes target files use (tests only; tomllib cannot write)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += [f"[[{k}]]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


mutations = st.sampled_from([
    ("drop", ("name",)), ("drop", ("cost",)), ("drop", ("defaults",)), ("drop", ("kernels",)),
    ("set", ("name",), 3), ("set", ("accumulator_bits",), "wide"), ("set", ("accumulator_bits",), 12),
    ("set", ("fusions",), "Conv+Relu"), ("set", ("float_ops",), ["Frobnicate"]),
    ("set", ("defaults", "weight"), "int9/tensor/sym"), ("set", ("defaults", "weight"), "float"),
    ("set", ("uniform", "weight_granularities"), ["row"]), ("set", ("uniform", "pow2_scales"), "maybe"),
    ("set", ("cost", "memory_bandwidth_gbps"), -1), ("set", ("cost", "macs_per_second"), {"int8": 1.0}),
    ("set", ("cost", "lut_lookups_per_second"), "fast"), ("set", ("bogus_key",), 1),
    ("set", ("uniform", "bogus"), 1), ("kernel", "ops", ["Frobnicate"]), ("kernel", "kernel", "magic"),
    ("kernel", "scheme", "bcq"), ("kernel", "weight_bits", [0]), ("kernel", "weight_bits", "8"),
    ("kernel", "extra", 1), ("raw", "name = [unclosed"), ("set", ("defaults", "activation"), "int8/channel/sym"),
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutations, min_size=1, max_size=3), st.integers(0, 10))
def test_malformed_tomls_get_typed_errors(tmp_path, muts, kernel_index):
    raw = _shipped_raw()
    text = None
    for m in muts:
        if m[0] == "drop":
            raw.pop(m[1][0], None)
        elif m[0] == "set":
            node = raw
            for k in m[1][:-1]:
                node = node.setdefault(k, {})
            node[m[1][-1]] = m[2]
        elif m[0] == "kernel" and raw.get("kernels"):
            raw["kernels"][kernel_index % len(raw["kernels"])][m[1]] = m[2]
        elif m[0] == "raw":
            text = m[1]
    p = tmp_path / "bad.toml"
    p.write_text(text if text is not None else _dump(raw))
    with pytest.raises(TargetError) as e:  # every mutation above breaks the spec: never a deep traceback
        load_target(str(p))
    assert "bad.toml" in str(e.value)


def test_inheritance_cycle_is_named(tmp_path):
    (tmp_path / "a.toml").write_text('inherits = "b.toml"\nname = "a"\n')
    (tmp_path / "b.toml").write_text('inherits = "a.toml"\nname = "b"\n')
    with pytest.raises(TargetError, match="cycle: a -> b -> a"):
        load_target(str(tmp_path / "a.toml"))


@pytest.mark.parametrize("body, key", [
    ('name = "x"\n[cost]\nmemory_bandwidth_gbps = "fast"\n', "inherits|defaults|kernels|cost"),
])
def test_missing_and_wrong_keys_named(tmp_path, body, key):
    p = tmp_path / "t.toml"
    p.write_text(body)
    with pytest.raises(TargetError, match=f"t.toml: key '({key})"):
        load_target(str(p))
