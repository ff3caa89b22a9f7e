"""Target TOML validation is derived from the frozen dataclasses once: allowed keys, types, defaults and allowed
values come from the fields and their ``rule(...)``; a corpus of bad TOMLs gets TargetErrors naming the file, the
table/key and what is allowed."""
import dataclasses
import typing

import pytest

from qgraph import TargetError, load_target
from qgraph.quant.qspec import QSpec
from qgraph.target import (
    BCQCaps,
    CostFigures,
    Defaults,
    KernelRule,
    Target,
    UniformCaps,
    _from_table,
    rule,
    toml_keys,
)

BASE = 'inherits = "generic"\nname = "bad"\n'
GEMM_RULE = '[[kernels]]\nops = ["Gemm"]\nscheme = "uniform"\nweight_bits = [8]\nkernel = "int8_gemm"\n'

# (TOML body, fragments the message must contain: the key with its table, and the allowed values)
CORPUS = [
    (BASE + "bogus = 1\n", ["unknown key 'bogus'", "allowed keys: name, description, accumulator_bits"]),
    (BASE + "[uniform]\nbogus = 1\n", ["unknown key 'uniform.bogus'", "allowed keys in [uniform]:",
                                       "weight_granularities", "group_sizes"]),
    (BASE + "[bcq]\nrows = 1\n", ["unknown key 'bcq.rows'", "granularities, group_sizes, offset"]),
    (BASE + "[cost]\nwatts = 3.0\n", ["unknown key 'cost.watts'", "memory_bandwidth_gbps"]),
    (BASE + "[defaults]\nbias = 'int8/tensor/sym'\n", ["unknown key 'defaults.bias'",
                                                       "weight, activation, embedding"]),
    (BASE + GEMM_RULE + "extra = 1\n", ["unknown key 'kernels[0].extra'", "ops, scheme, weight_bits"]),
    (BASE + "name = 3\n", None),  # duplicate key: not TOML
    ('inherits = "generic"\nname = 3\n', ["key 'name' must be str, got a value 3 (int)"]),
    (BASE + "accumulator_bits = 12\n", ["key 'accumulator_bits'", "12", "allowed: 16, 32"]),
    (BASE + "accumulator_bits = true\n", ["key 'accumulator_bits' must be int", "True (bool)"]),
    (BASE + "accumulator_bits = 'wide'\n", ["key 'accumulator_bits' must be int", "'wide' (str)"]),
    (BASE + "fusions = 'Conv+Relu'\n", ["key 'fusions' must be a list of str"]),
    (BASE + "float_ops = ['Frobnicate']\n", ["key 'float_ops'", "'Frobnicate'", "canonical ONNX op names"]),
    (BASE + "uniform = 3\n", ["key 'uniform' must be a table, got 3"]),
    (BASE + "[uniform]\nweight_granularities = ['row']\n", ["key 'uniform.weight_granularities'", "'row'",
                                                            "allowed: channel, group, tensor"]),
    (BASE + "[uniform]\npow2_scales = 'maybe'\n", ["key 'uniform.pow2_scales'", "optional, required, unsupported"]),
    (BASE + "[uniform]\nweight_symmetric = [1]\n", ["key 'uniform.weight_symmetric' must be a list of bool"]),
    (BASE + "[uniform]\ngroup_sizes = [0]\n", ["key 'uniform.group_sizes'", "out of range", ">= 1 and <= 65536"]),
    (BASE + "[uniform]\ngroup_sizes = [32.0]\n", ["key 'uniform.group_sizes' must be a list of int"]),
    (BASE + "[bcq]\ngroup_sizes = [70000]\n", ["key 'bcq.group_sizes'", "70000", "<= 65536"]),
    (BASE + "[bcq]\ngranularities = ['tensor']\n", ["key 'bcq.granularities'", "allowed: channel, group"]),
    (BASE + "[bcq]\noffset = 'yes'\n", ["key 'bcq.offset' must be bool"]),
    (BASE + "[defaults]\nweight = 'int9/tensor/sym'\n", ["key 'defaults.weight' is not a valid QSpec"]),
    (BASE + "[defaults]\nweight = 'float'\n", ["key 'defaults.weight' must name a quantization"]),
    (BASE + "[defaults]\nweight = 8\n", ["key 'defaults.weight' must be a QSpec string"]),
    (BASE + "[defaults]\nactivation = 'int8/channel/sym'\n", ["key 'defaults.activation'", "rejects"]),
    (BASE + "[cost]\nmemory_bandwidth_gbps = -1\n", ["key 'cost.memory_bandwidth_gbps'", "finite float > 0"]),
    (BASE + "[cost]\nmemory_bandwidth_gbps = nan\n", ["key 'cost.memory_bandwidth_gbps'", "out of range"]),
    (BASE + "[cost]\nlut_lookups_per_second = 'fast'\n", ["key 'cost.lut_lookups_per_second' must be float"]),
    (BASE + "[cost]\ncall_overhead_us = -0.5\n", ["key 'cost.call_overhead_us'", "finite float >= 0"]),
    (BASE + "[cost]\ncache_bytes = 1.5\n", ["key 'cost.cache_bytes' must be int"]),
    (BASE + "[cost]\nmacs_per_second = { int8 = -1.0, fp32 = 1.0 }\n", ["key 'cost.macs_per_second.int8'", "> 0"]),
    (BASE + "[cost]\nmacs_per_second = 5\n", ["key 'cost.macs_per_second' must be a table of float"]),
    (BASE + "[cost]\nsources = { a = 1 }\n", ["key 'cost.sources.a' must be str"]),
    (BASE + "[cost]\nbiqgemm_lut_max_rows = { slow = 1 }\n", ["key 'cost.biqgemm_lut_max_rows.slow'",
                                                              "allowed keys: exact, fast"]),
    (BASE + "[cost]\nbiqgemm_lut_max_rows = { exact = -1 }\n", ["key 'cost.biqgemm_lut_max_rows.exact'", ">= 0"]),
    (BASE + "kernels = [1]\n", ["key 'kernels[0]' must be a table, got 1"]),
    (BASE + "kernels = 'all'\n", ["key 'kernels' must be a list of tables"]),
    (BASE + GEMM_RULE.replace('"int8_gemm"', '"magic"'), ["key 'kernels[0].kernel'", "'magic'", "biqgemm, float"]),
    (BASE + GEMM_RULE.replace("[8]", "[0]"), ["key 'kernels[0].weight_bits'", ">= 1 and <= 8"]),
    (BASE + GEMM_RULE.replace("[8]", '"8"'), ["key 'kernels[0].weight_bits' must be a list of int"]),
    (BASE + GEMM_RULE.replace('"uniform"', '"ternary"'), ["key 'kernels[0].scheme'", "allowed: bcq, uniform"]),
    (BASE + GEMM_RULE.replace('scheme = "uniform"\n', ""), ["key 'kernels[0].scheme' is missing"]),
    (BASE + "bcq = false\n", ["key 'kernels[4].scheme' is 'bcq' but the target has no [bcq] table"]),
    ('name = "x"\n', ["key 'kernels' is missing"]),
    ('name = "x"\nkernels = []\n[cost]\n', ["key 'defaults' is missing"]),
    ("name = [unclosed", ["not valid TOML"]),
    ('inherits = 3\nname = "x"\n', ["'inherits' must be a target name or a list of names"]),
]


@pytest.mark.parametrize("body, fragments", CORPUS, ids=[f"bad{i}" for i in range(len(CORPUS))])
def test_bad_toml_corpus_is_a_typed_error_naming_file_key_and_allowed(tmp_path, body, fragments):
    p = tmp_path / "bad_target.toml"
    p.write_text(body)
    with pytest.raises(TargetError) as e:
        load_target(str(p))
    msg = str(e.value)
    assert msg.startswith(str(p) + ": "), msg
    for frag in fragments or ["not valid TOML"]:
        assert frag in msg, (frag, msg)


TABLES = [Target, UniformCaps, BCQCaps, KernelRule, CostFigures, Defaults]


@pytest.mark.parametrize("cls", TABLES, ids=lambda c: c.__name__)
def test_allowed_keys_are_the_dataclass_fields(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    assert list(toml_keys(cls)) == [n for n in names if n != "source"]


def _wrong_value(tp):
    """A TOML value that no field of type ``tp`` accepts."""
    return {str: 1, int: "one", float: "one", bool: "yes"}.get(tp, 1.5)


def _cases():
    for cls, prefix in [(Target, ""), (UniformCaps, "uniform"), (BCQCaps, "bcq"), (CostFigures, "cost"),
                        (Defaults, "defaults")]:
        for name, tp in typing.get_type_hints(cls).items():
            if name in toml_keys(cls):
                yield cls, prefix, name, tp


@pytest.mark.parametrize("cls, prefix, name, tp", list(_cases()), ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_field_rejects_a_wrong_type_by_name(tmp_path, cls, prefix, name, tp):
    """Generated from the dataclasses: every key of every table rejects a value of the wrong type, by its name."""
    line = f"{name} = {_toml(_wrong_value(tp))}\n"
    head = 'inherits = "generic"\n' + ('' if name == "name" else 'name = "bad"\n')
    body = head + (f"[{prefix}]\n" + line if prefix else line)
    p = tmp_path / "t.toml"
    p.write_text(body)
    with pytest.raises(TargetError, match=f"t.toml: key '{prefix + '.' if prefix else ''}{name}'"):
        load_target(str(p))


def _toml(v):
    return f'"{v}"' if isinstance(v, str) else str(v)


def test_omitted_keys_take_the_dataclass_defaults(tmp_path):
    p = tmp_path / "min.toml"
    p.write_text('name = "min"\nkernels = []\n[defaults]\nweight = "int8/channel/sym"\n'
                 '[cost]\nmemory_bandwidth_gbps = 1.0\nmacs_per_second = { fp32 = 1.0 }\n'
                 'lut_lookups_per_second = 1.0\ncall_overhead_us = 0\n')
    t = load_target(str(p))
    assert t.uniform == UniformCaps() and t.bcq is None and t.accumulator_bits == 32
    assert t.defaults == Defaults(weight=QSpec.parse("int8/channel/sym"))
    assert t.cost.cache_bytes == 32 * 1024 * 1024 and t.cost.biqgemm_lut_max_rows == {"exact": 4, "fast": 4}
    assert t.source == str(p)


def test_a_new_field_is_validated_without_new_code():
    """A field added to a table (e.g. a target's ``dynamic`` activation flag) is a checked key at once."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended:
        dynamic: bool = rule(False)
        modes: tuple[str, ...] = rule(("a",), choices=("a", "b"))
        rows: int = rule(4, lo=1, hi=8)

    assert _from_table(Extended, {}, "x", "f.toml") == Extended()
    assert _from_table(Extended, {"dynamic": True, "modes": ["b"], "rows": 8}, "x", "f.toml") == Extended(
        dynamic=True, modes=("b",), rows=8)
    for bad, frag in [({"dynamic": 1}, "key 'x.dynamic' must be bool"), ({"modes": ["c"]}, "allowed: a, b"),
                      ({"rows": 9}, "<= 8"), ({"other": 1}, "unknown key 'x.other'; allowed keys in [x]: dynamic")]:
        with pytest.raises(TargetError, match="f.toml: ") as e:
            _from_table(Extended, bad, "x", "f.toml")
        assert frag in str(e.value)
