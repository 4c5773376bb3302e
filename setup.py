"""Builds fopru_kernels._C: the C++ ops (CPU kernels) and, when a CUDA toolkit is present, the CUDA kernels.

Environment:
  FOPRU_BUILD_CUDA=0|1   force the CUDA kernels off / on (default: on when nvcc and a CUDA build of torch are found)
  FOPRU_CUDA_ARCHS       ';'-separated compute capabilities for -gencode (default "80;90")
  MAX_JOBS               parallel compile jobs (torch's ninja build)

The library is loaded with torch.ops.load_library and has no Python module init: it registers
the ops with the dispatcher, so C++-only processes can load the same file.
"""
from __future__ import annotations

import glob
import os
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

# torch guesses CUDA_HOME from the nvcc on PATH; with /usr/local/bin/nvcc it guesses /usr/local,
# which holds no CUDA headers. Prefer the toolkit's own folder when there is one.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _nvidia_include_dirs() -> list[str]:
    """Headers torch includes (cusparse.h, cublas_v2.h, ...) that a bare system toolkit may lack:
    take them from the nvidia-* wheels torch depends on. Never gated on a GPU being present."""
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        dirs += glob.glob(os.path.join(sp, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
    seen, out = set(), []
    for d in dirs:
        d = os.path.realpath(d)
        if os.path.isdir(d) and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("FOPRU_BUILD_CUDA")
    found = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not found:
            raise SystemExit("FOPRU_BUILD_CUDA=1 but no CUDA toolkit (CUDA_HOME/nvcc) or no CUDA build of torch")
        return True
    return found


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # -fopenmp: at::parallel_for is inlined here and runs serially unless OpenMP is on (libgomp is
    # the runtime torch itself loads).
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    if not _want_cuda():
        return [CppExtension("fopru_kernels._C", sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    archs = [a.strip() for a in os.environ.get("FOPRU_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    for a in archs:
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    nvcc += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return [
        CUDAExtension(
            "fopru_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT)),
            include_dirs=[CSRC] + _nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    os.chdir(ROOT)
    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    )


if __name__ == "__main__":
    main()
