"""scripts/gpu_check.sh on a machine without a GPU: every path and module it runs on the GPU host
resolves, and the compute-sanitizer cases (scripts/sanitizer/) import from where they live.

The script runs on a lent GPU host from a copy of the working tree, where a stale path costs the
whole lease; these checks find it here first. Nothing here touches the GPU.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fopru_kernels as F

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
SANITIZER_CASES = sorted((ROOT / "scripts" / "sanitizer").glob("case_*.py"))
STEPS = ["env", "build", "cxx", "tests", "bench", "serving", "memcheck", "racecheck"]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_every_step_and_each_path_resolves(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = (out / "summary.txt").read_text()
    for step in STEPS:
        assert re.search(rf"^{step} +DRY ", summary, re.M), f"step {step} not listed:\n{summary}"
    commands = [ln[2:] for ln in (out / "gpu_check.log").read_text().splitlines() if ln.startswith("$ ")]
    modules = {m for c in commands for m in re.findall(re.escape(sys.executable) + r" -m ([\w.]+)", c)} - {"pytest"}
    assert {"benchmarks.report", "benchmarks.serving"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"gpu_check runs -m {module}, which does not exist"
    words = " ".join(commands).replace("'", " ").split()
    paths = [w for w in words if re.fullmatch(r"(tests|scripts|benchmarks)/\S+\.py", w)]
    assert any(p.startswith("tests/") for p in paths)
    for p in paths:
        assert (ROOT / p).is_file(), f"gpu_check runs {p}, which does not exist"
    assert SANITIZER_CASES and all(str(c.relative_to(ROOT)) in paths for c in SANITIZER_CASES)


def test_every_listed_test_file_has_gpu_tests():
    # The GPU steps pick tests by marker from the files GPU_TESTS lists: each must hold some tests
    # marked `cuda`, and every GPU test file must be listed.
    pytest.importorskip("triton")  # test_qk.py skips itself without it
    files = re.search(r'^GPU_TESTS="([^"]*)"', SCRIPT.read_text(), re.M).group(1).split()
    run = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    marked = {line.split("::")[0] for line in run.stdout.splitlines() if "::" in line}
    assert marked == set(files), f"files with tests marked cuda: {sorted(marked)}; GPU_TESTS: {files}"


def test_sanitizer_cases_run_from_anywhere(tmp_path):
    # A fresh interpreter outside the repository, as compute-sanitizer starts them: each case finds
    # the package and the test helpers it imports from its own location. Without a GPU (or without
    # the CUDA kernels) each says so and exits 1; with them each runs its cases and exits 0.
    pytest.importorskip("triton")  # the q/k case builds on tests/test_qk.py, which needs it
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code, *map(str, SANITIZER_CASES)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    gpu = torch.cuda.is_available() and F.HAS_CUDA_KERNELS
    assert run.stdout.count(f"exit {0 if gpu else 1}\n") == len(SANITIZER_CASES), run.stdout + run.stderr
    if not gpu:
        assert run.stdout.count("needs a GPU and the library's CUDA kernels") == len(SANITIZER_CASES)


def test_sanitizer_case_grids_build():
    # The cases are built from the tests' case types (tests/cases.py) and checked by their check
    # functions (tests/test_prune_tokens.py, tests/test_qk.py): a change there that breaks them shows
    # here, not on the GPU host.
    for path in SANITIZER_CASES:
        spec = importlib.util.spec_from_file_location(f"sanitizer_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert callable(module.main)
        if hasattr(module, "cases"):
            assert len(list(module.cases())) >= 12
