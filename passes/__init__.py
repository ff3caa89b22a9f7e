"""Built-in passes, one per module; importing this package registers them all."""
from qgraph.passes import (  # noqa: F401
    annotate,
    calibrate,
    dce,
    fold_bn,
    fuse_activation,
    insert_fq,
    quantize_weights,
)
