"""Built-in passes, one per module; importing this package registers them all."""
import qgraph.analyses  # noqa: F401  (registers the built-in analyses)
from qgraph.passes import (  # noqa: F401
    annotate,
    calibrate,
    check_target,
    clip_search,
    dce,
    embedding_bits_by_frequency,
    embedding_rowwise,
    fold_bn,
    fuse_activation,
    gptq,
    insert_fq,
    lower_bcq,
    lower_embedding,
    lower_int8,
    lower_weight_only,
    multipoint,
    quantize_weights,
    smooth_quant,
    sparq,
    verify,
)
