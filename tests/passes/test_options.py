"""Every pass's Options validates its ranges in ``__post_init__``: a bad value is a `PipelineError` (an
`OptionError`) when the pipeline is parsed, before anything is traced or calibrated."""
import dataclasses

import pytest

from qgraph import PassManager, PipelineError, parse_pipeline, registered_passes
from qgraph.errors import OptionError

# (pipeline text, the message after "pass '<name>': ")
BAD = [
    ("smooth-quant{alpha=2}", "option 'alpha' must be 'auto' or a number in [0, 1], got 2.0"),
    ("smooth-quant{alpha=-0.1}", "option 'alpha' must be 'auto' or a number in [0, 1], got -0.1"),
    ("smooth-quant{min_scale=0}", "option 'min_scale' must be > 0, got 0.0"),
    ("clip-search{evals=-1}", "option 'evals' must be >= 0, got -1"),
    ("clip-search{min_scale=1.5}", "option 'min_scale' must be in (0, 1], got 1.5"),
    ("clip-search{max_scale=0.5}", "option 'max_scale' must be >= 1, got 0.5"),
    ("clip-search{samples=0}", "option 'samples' must be >= 1, got 0"),
    ("brecq{merge=0}", "option 'merge' must be >= 1, got 0"),
    ("brecq{batch=-1}", "option 'batch' must be >= 0, got -1"),
    ("brecq{warmup=1.5}", "option 'warmup' must be in [0, 1], got 1.5"),
    ("adaround{lr=0}", "option 'lr' must be > 0, got 0.0"),
    ("adaround{max_rows=-1}", "option 'max_rows' must be >= 0, got -1"),
    ("annotate{bits=99}", "option 'bits' must be none or in [1, 8], got 99"),
    ("annotate{scheme=uniform,bits=1}", "option 'bits' must be none or in [2, 8], got 1"),
    ("annotate{act_bits=1}", "option 'act_bits' must be none or 0 (float activations) or in [2, 8], got 1"),
    ("annotate{group_size=0}", "option 'group_size' must be none or >= 1, got 0"),
    ("annotate{granularity=group}", "option 'group_size' must be set with granularity=group, got none"),
    ("annotate{skip=[\"(\"]}", "option 'skip' must be a list, each item a regular expression, got [(]"),
    ("annotate{act_observer=maxmin}", "option 'act_observer' must be none or an observer: minmax, "
                                      "moving_average, percentile, mse, entropy, got maxmin"),
    ("calibrate{p=0}", "option 'p' must be in (0, 100], got 0.0"),
    ("calibrate{max_batches=0}", "option 'max_batches' must be none or >= 1, got 0"),
    ("gptq{block=0}", "option 'block' must be >= 1, got 0"),
    ("gptq{damp=-0.01}", "option 'damp' must be >= 0, got -0.01"),
    ("aespa{value_rows=0}", "option 'value_rows' must be >= 1, got 0"),
    ("aespa{block=0}", "option 'block' must be >= 1, got 0"),
    ("multipoint{max_points=0}", "option 'max_points' must be >= 1, got 0"),
    ("multipoint{extra=-1}", "option 'extra' must be >= 0, got -1.0"),
    ("quantize-weights{p=0}", "option 'p' must be > 0, got 0.0"),
    ("sparq{bits=0}", "option 'bits' must be in [1, 8], got 0"),
    ("sparq{shifts=[0,-2]}", "option 'shifts' must be a list, each item >= 0, got [0,-2]"),
    ("verify{tol=-1}", "option 'tol' must be >= 0, got -1.0"),
    ("embedding-rowwise{bits=3}", "option 'bits' must be 4 or 8 (the row-wise gather kernels), or none, got 3"),
    ("embedding-rowwise{max_trim=1}", "option 'max_trim' must be in [0, 1), got 1.0"),
    ("embedding-bits-by-frequency{bits=[]}", "option 'bits' must be a non-empty list, each item in [1, 8], got []"),
    ("embedding-bits-by-frequency{bits=[2,3],avg_bits=1.5}", "option 'avg_bits' must be >= the fewest bits 2, "
                                                             "got 1.5"),
    ("fuse-activation{patterns=[Conv]}", "option 'patterns' must be a list, each item of the form "
                                         "\"Producer+Activation\", got [Conv]"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[t for t, _ in BAD])
def test_bad_option_is_a_pipeline_error_at_parse_time(text, message):
    name = text.split("{")[0]
    with pytest.raises(PipelineError) as info:
        PassManager(text)  # parsing only: nothing is traced, calibrated or run
    assert isinstance(info.value, OptionError)
    assert str(info.value) == f"pass '{name}': {message}"


def test_issue_examples_fail_in_the_constructor():
    for text in ["smooth-quant{alpha=2}", "clip-search{evals=-1}", "brecq{merge=0}", "annotate{bits=99}"]:
        with pytest.raises(PipelineError, match=f"pass '{text.split('{')[0]}': option"):
            PassManager(text)


def test_options_built_in_python_are_checked_too():
    smooth = registered_passes()["smooth-quant"]
    with pytest.raises(OptionError, match="option 'alpha' must be 'auto' or a number in \\[0, 1\\], got 1.5"):
        smooth.Options(alpha=1.5)
    with pytest.raises(OptionError):
        dataclasses.replace(smooth.Options(), alpha=-1.0)
    assert smooth(smooth.Options(alpha=0.5)).options.alpha == 0.5


def test_defaults_and_edges_are_valid():
    for name, cls in registered_passes().items():
        try:
            cls.Options()
        except TypeError:  # options without defaults (none of the built-in passes has any)
            pytest.fail(f"{name}: an option has no default")
    ok = ("smooth-quant{alpha=0},smooth-quant{alpha=1},clip-search{evals=0,min_scale=1,max_scale=1},"
          "annotate{act_bits=0,bits=1,scheme=bcq},annotate{bits=8,granularity=group,group_size=32},"
          "calibrate{method=percentile,p=100},embedding-bits-by-frequency{bits=[2,3],avg_bits=2},"
          "embedding-rowwise{bits=none},verify{tol=0}")
    assert len(parse_pipeline(ok)) == 9

