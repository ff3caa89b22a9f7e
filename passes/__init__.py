"""Built-in passes, one per module; importing this package registers them all."""
from qgraph.passes import dce, fold_bn, fuse_activation  # noqa: F401
