"""Build of mlkd_fast: pure Python + Triton always; the compiled csrc/ library when it can be built.

Environment switches (never a GPU probe; the build machine need not have one):
  MLKD_FAST_SKIP_NATIVE=1   build no compiled library (pure Python + Triton)
  MLKD_FAST_SKIP_CUDA=1     build the C++ CPU kernels only
  MLKD_FAST_FORCE_NATIVE=1  fail the install if the compiled library (CUDA too, unless skipped)
                            cannot be built, instead of falling back
  MLKD_FAST_CUDA_ARCHS      target architectures, default "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST)
CUDA kernels are compiled when torch has CUDA and a CUDA toolkit (CUDA_HOME or nvcc on PATH) is found.
"""
from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["mlkd_fast", "mlkd_fast.train", "mlkd_fast.methods", "mlkd_fast.kernels", "mlkd_fast.lm"]
PACKAGE_DIR: dict[str, str] = {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The CUDA toolkit root for torch's extension builder when CUDA_HOME is unset: the folder above
    nvcc's bin/. A wrapper script named nvcc (as on some machines) names the real nvcc on its
    last line; without this, torch guesses the wrapper's parent and the link fails on -lcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4)
            is_script = head[:2] == b"#!"
            lines = (head + f.read(65536)).decode(errors="ignore").strip().splitlines() if is_script else []
    except OSError:
        return None
    if lines:
        for token in reversed(lines[-1].replace('"', " ").replace("'", " ").split()):
            if token.endswith(os.path.join("bin", "nvcc")) and os.path.isfile(token):
                real = os.path.realpath(token)
                break
    root = os.path.dirname(os.path.dirname(real))
    return root if os.path.isdir(os.path.join(root, "include")) else None


def _native_extensions():
    """(ext_modules, cmdclass) for the compiled library, or ([], {}) when it is skipped."""
    if _flag("MLKD_FAST_SKIP_NATIVE"):
        return [], {}
    # csrc/ by device: csrc/cuda/ (the .cu kernels and their C++ glue) is compiled only with CUDA;
    # every other C++ file (registration.cpp, csrc/cpu/) always.
    cuda_dir = os.path.join("csrc", "cuda", "")
    all_cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cpp_sources = [s for s in all_cpp if not s.startswith(cuda_dir)]
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cuda_sources = [s for s in all_cpp if s.startswith(cuda_dir)] + cu_sources
    if not cpp_sources:
        return [], {}
    if cu_sources and not _flag("MLKD_FAST_SKIP_CUDA"):
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if _flag("MLKD_FAST_FORCE_NATIVE"):
            raise
        warnings.warn("torch is not importable at build time (use --no-build-isolation): "
                      "building mlkd_fast without its compiled library")
        return [], {}

    with_cuda = bool(torch.version.cuda) and not _flag("MLKD_FAST_SKIP_CUDA") and bool(cu_sources)
    if with_cuda and cpp_extension.CUDA_HOME is None:
        if _flag("MLKD_FAST_FORCE_NATIVE"):
            raise RuntimeError("MLKD_FAST_FORCE_NATIVE=1 but no CUDA toolkit was found (set CUDA_HOME)")
        warnings.warn("no CUDA toolkit found (CUDA_HOME / nvcc): building the C++ CPU kernels only")
        with_cuda = False

    # at::parallel_for's OpenMP path is inline: without -fopenmp the extension runs it serially.
    omp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # The sources include ATen's per-operator headers (ATen/ops/, in every torch wheel); this macro tells
    # ATen's own headers to do the same instead of pulling in all of ATen/Functions.h (~5 s per file).
    cxx_flags = ["-O3", "-DAT_PER_OPERATOR_HEADERS"] + omp
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("MLKD_FAST_CUDA_ARCHS", "8.0;9.0"))
        ext = cpp_extension.CUDAExtension(
            "mlkd_fast._C",
            cpp_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DMLKD_WITH_CUDA"],
                "nvcc": ["-O3", "-DMLKD_WITH_CUDA", "--use_fast_math",
                         "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=omp,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "mlkd_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=omp,
            py_limited_api=True,
        )

    class BuildExt(cpp_extension.BuildExtension):
        """Falls back to a pure-Python install when the compiler fails, unless forced."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if _flag("MLKD_FAST_FORCE_NATIVE"):
                    raise
                warnings.warn(f"building the compiled library failed ({exc}); mlkd_fast installs "
                              "without it (backend='native' will say why). Set "
                              "MLKD_FAST_FORCE_NATIVE=1 to make this an error.")
                print(f"mlkd_fast: native build failed: {exc}", file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _native_extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
