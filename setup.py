"""Builds fopru_kernels._C: the C++ ops (CPU kernels) and, when a CUDA toolkit is present, the CUDA kernels.

Environment:
  FOPRU_BUILD_CUDA=0|1   force the CUDA kernels off / on (default: on when nvcc and a CUDA build of torch are found)
  FOPRU_CUDA_ARCHS       ';'-separated compute capabilities for -gencode (default "80;90"; 80 or above)
  MAX_JOBS               parallel compile jobs (torch's ninja build)

The library is loaded with torch.ops.load_library and has no Python module init: it registers
the ops with the dispatcher, so C++-only processes can load the same file.
"""
from __future__ import annotations

import glob
import os
import re
import site
import subprocess
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


# The CUDA kernels use cp.async and mma.sync with bf16 inputs (sm_80 features), and the ragged-batch
# kernel passes more than 4 KiB of kernel parameters (CUDA 12.1+). CMakeLists.txt checks the same.
MIN_CUDA_ARCH = 80
MIN_NVCC = (12, 1)


def cuda_archs(text: str) -> list[str]:
    """FOPRU_CUDA_ARCHS ("80;90"; commas work too) as the list of -gencode compute capabilities.
    Raises SystemExit naming the variable unless every entry is a capability of 80 or above
    (digits, optionally with an arch-specific suffix: "90a")."""
    archs = [a.strip() for a in text.replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"[0-9]+[af]?", a) or int(a.rstrip("af")) < MIN_CUDA_ARCH]
    if not archs or bad:
        raise SystemExit(
            f"FOPRU_CUDA_ARCHS must list compute capabilities of {MIN_CUDA_ARCH} or above, such as '80;90' "
            f"(the CUDA kernels use cp.async and bf16 mma.sync, sm_80 features), got {text!r}; "
            "FOPRU_BUILD_CUDA=0 builds without the CUDA kernels"
        )
    return archs


def check_nvcc_version(version: tuple[int, int]) -> None:
    """Raises SystemExit unless nvcc `version` (major, minor) is at least MIN_NVCC."""
    if tuple(version) < MIN_NVCC:
        raise SystemExit(
            f"the CUDA kernels need CUDA {MIN_NVCC[0]}.{MIN_NVCC[1]} or newer (nvcc), found "
            f"{version[0]}.{version[1]}: the ragged-batch kernel passes more than 4 KiB of kernel parameters; "
            "FOPRU_BUILD_CUDA=0 builds without the CUDA kernels"
        )


def nvcc_version(cuda_home: str) -> tuple[int, int]:
    """(major, minor) of the nvcc in cuda_home/bin, from `nvcc --version`."""
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if m is None:
        raise SystemExit(f"cannot read the CUDA version from {cuda_home}/bin/nvcc --version: {out!r}")
    return int(m.group(1)), int(m.group(2))


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

    sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT)) + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # -fopenmp: at::parallel_for is inlined here and runs serially unless OpenMP is on (libgomp is
    # the runtime torch itself loads).
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    if not _want_cuda():
        return [CppExtension("fopru_kernels._C", sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    from torch.utils.cpp_extension import CUDA_HOME

    archs = cuda_archs(os.environ.get("FOPRU_CUDA_ARCHS", "80;90"))
    check_nvcc_version(nvcc_version(CUDA_HOME))
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
