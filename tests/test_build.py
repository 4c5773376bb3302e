"""The build refuses what the CUDA kernels cannot be built for, with a message naming the setting:
compute capabilities below 8.0 in FOPRU_CUDA_ARCHS (cp.async and bf16 mma.sync are sm_80 features)
and CUDA toolkits before 12.1 (the ragged-batch kernel passes more than 4 KiB of kernel parameters),
by setup.py and by CMakeLists.txt alike. Nothing is compiled here: setup.py's checks run in a fresh
interpreter (importing setup.py sets CUDA_HOME), CMake's in a configure step that stops before it
looks for LibTorch.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS_MESSAGE = "FOPRU_CUDA_ARCHS must list compute capabilities of 80 or above"
NVCC_MESSAGE = "the CUDA kernels need CUDA 12.1 or newer (nvcc), found"
BAD_ARCHS = ["75", "70;80", "80;61", "8.0", "sm_90", ""]


def run_setup(code: str, **env) -> subprocess.CompletedProcess:
    """`code` after `import setup`, in a fresh interpreter at the repository root."""
    return subprocess.run([sys.executable, "-c", "import setup\n" + code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.parametrize("archs", BAD_ARCHS)
def test_setup_refuses_archs_below_80(archs):
    r = run_setup(f"setup.cuda_archs({archs!r})")
    assert r.returncode == 1, r.stdout + r.stderr
    assert ARCHS_MESSAGE in r.stderr and repr(archs) in r.stderr


def test_setup_takes_archs_80_and_above():
    r = run_setup("print(setup.cuda_archs('80;90'), setup.cuda_archs(' 86, 90a ;100'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "['80', '90'] ['86', '90a', '100']"


@pytest.mark.parametrize("version,ok", [((11, 8), False), ((12, 0), False), ((12, 1), True), ((13, 0), True)])
def test_setup_refuses_nvcc_before_12_1(version, ok):
    r = run_setup(f"setup.check_nvcc_version({version!r})")
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    if not ok:
        assert f"{NVCC_MESSAGE} {version[0]}.{version[1]}" in r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit: setup.py builds without the CUDA kernels")
def test_setup_build_stops_at_the_check():
    """The extension list of a CUDA build (what `setup.py build_ext` compiles) is refused before any
    source is compiled."""
    r = run_setup("setup._extensions()", FOPRU_BUILD_CUDA="1", FOPRU_CUDA_ARCHS="75;80")
    assert r.returncode == 1 and ARCHS_MESSAGE in r.stderr, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.parametrize("archs", ["75;90", "80;70", "sm_80"])
def test_cmake_refuses_archs_below_80(tmp_path, archs):
    r = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path), "-DFOPRU_CUDA=ON", f"-DFOPRU_CUDA_ARCHS={archs}"],
                       capture_output=True, text=True, timeout=300)
    text = " ".join(r.stderr.split())  # CMake wraps its messages
    assert r.returncode != 0 and ARCHS_MESSAGE in text and f'got "{archs}"' in text, r.stdout + r.stderr
