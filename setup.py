"""Builds the BiQGEMM CPU kernel with the system C++ compiler.

The kernel is a plain shared library with a C ABI (no torch, no Python API use beyond the
module stub), so both the torch custom op and an onnxruntime custom op can call it.
ISA-specific code paths are compiled with per-function target attributes and chosen at
run time, so the binary runs on any x86-64 CPU (and compiles elsewhere with the scalar path).
"""
import platform

from setuptools import Extension, setup

compile_args = ["-O3", "-std=c++17", "-pthread", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
link_args = ["-pthread"]
if platform.machine().lower() in ("x86_64", "amd64"):
    compile_args.append("-mno-avx512f")  # ISA paths opt in per function; the baseline stays portable

setup(
    ext_modules=[
        Extension(
            "qgraph.kernels._biqgemm_cpu",
            sources=["qgraph/kernels/csrc/biqgemm.cpp"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            language="c++",
        )
    ]
)
