"""Builds csrc/cuda/*.cu for the CPU emulator in simt.h and loads it with ctypes.

The CUDA sources are compiled unchanged by g++ except for two mechanical rewrites that C++ cannot
parse: ``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``simt::launch(kernel, grid, block,
smem, stream, args)`` and ``extern __shared__ T name[];`` becomes a pointer to the emulated block's
dynamic shared memory. Needs g++ and the CUDA toolkit headers (cuda_fp16.h, cuda_runtime.h), not a GPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc" / "cuda"  # the .cu files and launchers.h; they include ../common.h
CUDA_SOURCES = ("kd_kl_cuda.cu", "correlation_cuda.cu")

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")


def cuda_include_dir() -> Optional[Path]:
    """The toolkit's include folder: CUDA_HOME / CUDA_PATH, else beside nvcc (a wrapper script named
    nvcc names the real one on its last line), else /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        real = Path(os.path.realpath(nvcc))
        roots.append(str(real.parents[1]))
        try:
            last = real.read_text(errors="ignore").strip().splitlines()[-1]
            roots += [str(Path(tok).parents[1]) for tok in last.replace('"', " ").split() if tok.endswith("bin/nvcc")]
        except (OSError, IndexError):
            pass
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def unavailable_reason() -> Optional[str]:
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include_dir() is None:
        return "CUDA toolkit headers not found (set CUDA_HOME)"
    return None


def emulated_source(cu_text: str) -> str:
    """A .cu file as C++ for the emulator: launches and dynamic shared memory rewritten."""
    text = _LAUNCH.sub(lambda m: f"::simt::launch({m.group(1)}, {m.group(2)}, ", cu_text)
    text = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::simt::dynamic_shared<{m.group(1)}>();", text)
    text = text.replace("#include <mma.h>", "")
    if "<<<" in text or "extern __shared__" in text:
        raise RuntimeError("a CUDA construct was left unrewritten for the emulator")
    return '#include "simt.h"\n' + text


def load() -> ctypes.CDLL:
    """Compiles (once per source version, under build/simt_emulator/) and loads the emulated kernels."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    inputs = [CSRC / name for name in CUDA_SOURCES] + [CSRC / "launchers.h", CSRC.parent / "common.h",
                                                       HERE / "simt.h", HERE / "driver.cpp", Path(__file__)]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    out_dir = REPO / "build" / "simt_emulator" / digest
    library = out_dir / "libsimt.so"
    if not library.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        units = [HERE / "driver.cpp"]
        for name in CUDA_SOURCES:
            unit = out_dir / (name + ".cpp")
            unit.write_text(emulated_source((CSRC / name).read_text()))
            units.append(unit)
        partial = out_dir / f"libsimt.{os.getpid()}.so"
        cmd = ["g++", "-O2", "-g", "-std=c++17", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-Wno-attributes",
               "-Wl,-Bsymbolic",  # its cudaGetLastError etc., not those of a libcudart torch loaded
               f"-I{HERE}", f"-I{CSRC}", f"-I{cuda_include_dir()}", *map(str, units), "-o", str(partial)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError("emulator build failed:\n" + " ".join(cmd) + "\n" + result.stderr[-6000:])
        os.replace(partial, library)  # atomic: a concurrent run never loads half a library
    lib = ctypes.CDLL(str(library))
    lib.simt_error.restype = ctypes.c_char_p
    return lib
