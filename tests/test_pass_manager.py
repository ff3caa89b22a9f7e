"""PassManager: ordering constraints, property checks, analyses and instruments."""
import itertools
from dataclasses import dataclass

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph import (
    DumpIRInstrument,
    Pass,
    PassContext,
    PassManager,
    PassOrderError,
    PassResult,
    PipelineError,
    TimingInstrument,
    VerifyInstrument,
    register_analysis,
    register_pass,
    trace,
)
from qgraph.registry import unregister_pass

# A fixed constraint DAG over five test passes: o-a → o-b → o-d, o-a → o-c, o-c before o-e.
_CONSTRAINTS = {"o-b": ("o-a",), "o-c": ("o-a",), "o-d": ("o-b",), "o-e": ("o-c",)}
for _name in ["o-a", "o-b", "o-c", "o-d", "o-e"]:
    register_pass(_name, after=_CONSTRAINTS.get(_name, ()), replace=True)(
        type(_name, (Pass,), {"run": lambda self, g, ctx: PassResult(g, modified=False)})
    )


def _allowed(order):
    pos = {n: i for i, n in enumerate(order)}
    dag = nx.DiGraph([(a, b) for b, afters in _CONSTRAINTS.items() for a in afters])
    return all(pos[a] < pos[b] for a, b in itertools.permutations(order, 2)
               if a in dag and b in dag and nx.has_path(dag, a, b))


@settings(max_examples=80, deadline=None)
@given(st.permutations(["o-a", "o-b", "o-c", "o-d", "o-e"]).flatmap(
    lambda p: st.integers(1, 5).map(lambda k: p[:k])))
def test_pass_manager_honours_ordering_constraints(order):
    text = ",".join(order)
    if _allowed(order):
        PassManager(text)  # accepted
    else:
        with pytest.raises(PassOrderError, match="must run before"):
            PassManager(text)


def test_transitive_constraint_is_enforced_without_the_middle_pass():
    with pytest.raises(PassOrderError, match="'o-a' must run before 'o-d'"):
        PassManager("o-d,o-a")


def test_ordering_cycle_is_a_clear_error():
    register_pass("cyc-x", after=("cyc-y",), replace=True)(type("X", (Pass,), {}))
    register_pass("cyc-y", after=("cyc-x",), replace=True)(type("Y", (Pass,), {}))
    try:
        with pytest.raises(PassOrderError, match="cycle: cyc-"):
            PassManager("dce")
    finally:
        unregister_pass("cyc-x")
        unregister_pass("cyc-y")


def test_requires_without_provider_is_reported_before_running():
    register_pass("needs-colour", requires=("coloured",), replace=True)(type("N", (Pass,), {}))
    register_pass("paint", ensures=("coloured",), replace=True)(
        type("P", (Pass,), {"run": lambda self, g, ctx: PassResult(g, modified=False)}))
    g = trace(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(PipelineError, match="requires the graph to be 'coloured'.*add 'paint' before it"):
        PassManager("needs-colour").run(g)
    register_pass("needs-colour", requires=("coloured",), replace=True)(
        type("N2", (Pass,), {"run": lambda self, g, ctx: PassResult(g, modified=False)}))
    PassManager("paint,needs-colour").run(g)
    assert "coloured" in g.properties


def test_custom_pass_in_a_few_lines_runs_in_a_textual_pipeline():
    # --- the custom pass: 10 lines ---
    @register_pass("scale-linear-weights", replace=True)
    def scale_linear_weights(graph, ctx, *, factor: float = 2.0):
        """Multiply every Gemm weight by `factor`."""
        changed = False
        for node in graph.nodes():
            if graph.op_type(node) == "Gemm":
                graph.set_param(node, "weight", graph.param(node, "weight") * factor)
                changed = True
        return changed
    # ---
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    x = torch.randn(3, 4)
    g = trace(model, (x,))
    result = PassManager("fold-bn,scale-linear-weights{factor=0.5},dce").run(g)
    assert result.modified
    torch.testing.assert_close(result.graph(x), model(x) * 0.25)
    assert str(PassManager("scale-linear-weights{factor=0.5}")) == "scale-linear-weights{factor=0.5}"


def test_analyses_are_cached_and_dropped_when_not_preserved():
    calls = []

    @register_analysis("test-node-count")
    def node_count(graph, ctx):
        calls.append(1)
        return len(graph.nodes())

    @register_pass("test-keeps-count", replace=True)
    class Keeps(Pass):
        def run(self, graph, ctx):
            ctx.analysis("test-node-count", graph)
            return PassResult(graph, modified=True, preserved=frozenset({"test-node-count"}))

    @register_pass("test-drops-count", replace=True)
    class Drops(Pass):
        def run(self, graph, ctx):
            ctx.analysis("test-node-count", graph)
            return PassResult(graph, modified=True)

    g = trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), (torch.randn(1, 2),))
    ctx = PassContext()
    PassManager("test-keeps-count,test-keeps-count").run(g, ctx)
    assert len(calls) == 1  # computed once, preserved by both
    PassManager("test-drops-count,test-keeps-count").run(g, ctx)
    assert len(calls) == 2  # dropped after test-drops-count, recomputed by the next pass
    assert "test-node-count" in ctx.cached_analyses()


def test_instruments_time_dump_and_verify(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    timing, dump = TimingInstrument(), DumpIRInstrument(tmp_path)
    PassManager("fold-bn,dce").run(trace(model, (x,)), PassContext(instruments=[timing, dump, VerifyInstrument()]))
    assert [name for name, _ in timing.timings] == ["fold-bn", "dce"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-input.txt", "01-fold-bn.txt", "02-dce.txt"]
    assert "BatchNormalization" in (tmp_path / "00-input.txt").read_text()
    assert "BatchNormalization" not in (tmp_path / "01-fold-bn.txt").read_text()


def test_verify_names_the_pass_that_broke_the_graph():
    @register_pass("test-breaks-shapes", replace=True)
    def breaks(graph, ctx):
        for node in graph.nodes():
            if graph.op_type(node) == "Gemm":
                graph.set_param(node, "weight", torch.zeros(5, 3))
                graph.set_param(node, "bias", torch.zeros(5))
        return True

    g = trace(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(PipelineError, match="pass 'test-breaks-shapes' changed the output shapes"):
        PassManager("test-breaks-shapes").run(g, PassContext(instruments=[VerifyInstrument()]))


def test_pass_returning_wrong_type_is_reported():
    @register_pass("test-returns-none-class", replace=True)
    class Bad(Pass):
        def run(self, graph, ctx):
            return graph

    g = trace(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(PipelineError, match="returned FxGraph, not a PassResult"):
        PassManager("test-returns-none-class").run(g)


def test_public_names_exist():
    for name in ["trace", "PassManager", "register_pass", "parse_pipeline", "QGraphError"]:
        assert hasattr(qgraph, name)


# --- unexpected exceptions inside a pass -----------------------------------------------------------
@register_pass("test-explodes", replace=True)
class _Explodes(Pass):
    @dataclass(frozen=True)
    class Options:
        level: int = 1

    def run(self, graph, ctx):
        return {"a": 1}["missing"]


@register_pass("test-typed-error", replace=True)
class _TypedError(Pass):
    def run(self, graph, ctx):
        raise qgraph.CalibrationError("no calibration data reached fc1")


def test_unexpected_exception_becomes_pass_error_naming_pass_options_and_predecessors():
    from qgraph.errors import PassError

    g = trace(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(PassError) as info:
        PassManager("o-a,o-b,o-c,test-explodes{level=3}").run(g)
    e = info.value
    first = str(e).splitlines()[0]
    assert first == "pass 'test-explodes{level=3}' (after o-a, o-b, o-c): KeyError: 'missing'"
    assert "options: " in str(e) and "level=3" in str(e)
    assert (e.pass_name, e.after, e.options.level) == ("test-explodes", ["o-a", "o-b", "o-c"], 3)
    assert isinstance(e.__cause__, KeyError)
    assert isinstance(e, qgraph.QGraphError)
    with pytest.raises(PassError, match=r"^pass 'test-explodes' \(first in the pipeline\): KeyError"):
        PassManager("test-explodes").run(g)


def test_pass_error_counts_passes_of_earlier_steps():
    from qgraph.errors import PassError

    calls = {"n": 0}

    @register_pass("test-second-step-fails", replace=True)
    def _second(graph, ctx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ZeroDivisionError("division by zero")
        return True

    g = trace(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(PassError, match=r"^pass 'test-second-step-fails' \(after o-a, test-second-step-fails, o-a\): "
                                        r"ZeroDivisionError: division by zero"):
        PassManager("o-a,test-second-step-fails", steps=3).run(g)


def test_typed_qgraph_errors_pass_through_unwrapped():
    g = trace(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(qgraph.CalibrationError, match="^no calibration data reached fc1$") as info:
        PassManager("o-a,test-typed-error").run(g)
    assert type(info.value) is qgraph.CalibrationError
