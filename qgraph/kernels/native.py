"""The native torch ops for the CPU kernels: ``csrc/torch_shim.cpp`` registers the CPU and AutogradCPU kernels of
``qgraph::biqgemm`` with torch's C++ dispatcher, so a call costs a few µs instead of Python validation + ctypes,
and the CPU kernel of ``qgraph::decode_attention`` (`qgraph.kernels.attention`).

The shim is built at first use against the torch that is installed (so ``pip install -e .`` never needs torch at
build time and build isolation can never pull another torch): the system C++ compiler (``$CXX``, else ``g++``,
else ``c++``), torch's headers and libraries, and the already built kernel library ``_biqgemm_cpu*.so`` (the C
kernel stays torch-free; the shim links it, so both paths share one kernel instance). The result is cached outside
the package, in ``$QGRAPH_CACHE_DIR/torch_ext`` (default ``$XDG_CACHE_HOME/qgraph`` or ``~/.cache/qgraph``), under a
name keyed by a hash of the shim's sources, the compiler command, torch's version and the Python version; a file
lock makes concurrent first uses build once. Compiling takes ~30 s on 2 cores, once per machine and torch.

If anything fails (no compiler, headers missing, a load error), one warning is printed and the op keeps its Python
implementation (validation + ctypes). ``QGRAPH_BIQGEMM_NATIVE=0`` disables the shim.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from qgraph.errors import KernelError

SHIM_VERSION = 4
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("torch_shim.cpp", "decode_step.cpp", "biqgemm.h", "decode_math.h")
_lock = threading.Lock()
_state: dict = {"tried": False, "path": None, "handle": None, "error": None}


def cache_dir() -> Path:
    base = os.environ.get("QGRAPH_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "qgraph")
    return Path(base) / "torch_ext"


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "g++", "c++"):
        if cand and shutil.which(cand):
            return cand
    raise KernelError("no C++ compiler found (set $CXX or install g++)")


def _command(kernel_so: str, out: str) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = cpp_extension.library_paths()[0]
    cmd = [_compiler(), "-O2", "-std=c++20", "-fPIC", "-shared", "-fvisibility=hidden", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [f"-I{sysconfig.get_paths()['include']}", f"-I{_CSRC}"]
    cmd += [str(_CSRC / n) for n in _SOURCES if n.endswith(".cpp")]
    cmd += ["-o", out,
            f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{torch_lib}",
            kernel_so]
    return cmd


def _key(cmd: list[str]) -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_CSRC / name).read_bytes())
    h.update(repr([c for c in cmd if not c.startswith("-o")]).encode())
    h.update(f"{torch.__version__}|{torch.version.git_version}|{sys.version}|{SHIM_VERSION}".encode())
    return h.hexdigest()[:20]


def _build(kernel_so: str) -> Path:
    probe = _command(kernel_so, "OUT")
    key = _key(probe)
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    target = d / f"qgraph_biqgemm_torch_{key}.so"
    if target.exists():
        return target
    import fcntl

    with open(d / f"{target.name}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if target.exists():  # built by another process while we waited
            return target
        fd, tmp = tempfile.mkstemp(dir=d, prefix=target.stem + ".", suffix=".tmp.so")
        os.close(fd)
        try:
            res = subprocess.run(_command(kernel_so, tmp), capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-4:])
                raise KernelError(f"compiling the torch shim failed (exit {res.returncode}): {tail}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def load(*, build: bool = True) -> bool:
    """Register the native CPU kernel with torch's dispatcher (building it on first use); True if it is active.
    Never raises: on failure it warns once and returns False (the Python implementation stays in place)."""
    if _state["handle"] is not None:
        return True
    with _lock:
        if _state["tried"]:
            return _state["handle"] is not None
        if os.environ.get("QGRAPH_BIQGEMM_NATIVE", "1").strip() in ("0", "false", "no", "off"):
            _state["tried"] = True
            _state["error"] = "disabled by QGRAPH_BIQGEMM_NATIVE=0"
            return False
        if not build:
            return False
        _state["tried"] = True
        try:
            from qgraph.kernels import attention, cpu  # noqa: F401 - attention defines the schema the shim implements

            lib = cpu._lib()  # the kernel library, loaded first so the shim binds to this very instance
            cpu._configure_default_threshold()
            path = _build(lib._name)
            torch.ops.load_library(str(path))
            handle = ctypes.CDLL(str(path))
            if handle.qg_torch_shim_version() != SHIM_VERSION:
                raise KernelError(f"{path} is shim version {handle.qg_torch_shim_version()}, expected {SHIM_VERSION}")
            handle.qg_torch_shim_set_native_layout.argtypes = [ctypes.c_int]
            _state["path"], _state["handle"] = path, handle
            _sync_native_layout()
        except Exception as e:  # noqa: BLE001 - any failure keeps the ctypes path
            _state["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"qgraph: the native torch op for the BiQGEMM CPU kernel is unavailable ({_state['error']}); "
                          f"using the Python + ctypes path (~15 µs more per call)", RuntimeWarning, stacklevel=2)
            return False
    return True


def active() -> bool:
    """Whether ``torch.ops.qgraph.biqgemm`` on CPU tensors runs the native kernel."""
    return _state["handle"] is not None


def status() -> dict:
    """What `load` did: ``{"active", "path", "error"}``."""
    return {"active": active(), "path": None if _state["path"] is None else str(_state["path"]),
            "error": _state["error"]}


def _sync_native_layout() -> None:
    """Tell the shim whether ``cpu-lut4`` still has qgraph's own implementation (a replaced one runs in Python)."""
    if _state["handle"] is None:
        return
    from qgraph.kernels import op

    _state["handle"].qg_torch_shim_set_native_layout(int(op.get_layout("cpu-lut4").impl is op._cpu_impl))
