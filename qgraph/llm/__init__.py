"""Language models on qgraph kernels: quantized module swap, generation and its artifacts."""
