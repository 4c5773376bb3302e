"""scripts/triton_compile_check.py: the compile check must catch what would fail on a GPU (negative
controls: too much shared memory, a compile error, coverage gaps) and pass a real case; and the
gpu_tuning hook the launchers read.

The check compiles, so it runs in subprocesses without TRITON_INTERPRET=1 (under the interpreter
@triton.jit makes functions that are never compiled); it needs no GPU (Triton bundles ptxas)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fopru_kernels.triton import target

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_compile_check.py"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FOPRU_COMPILE_CHECK_CACHE"] = str(tmp_path / "triton-cache")  # removed with tmp_path
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


# run_check on the control kernels, with DOMAINS that the launches miss in every way the coverage
# check knows; prints the results and the failures as JSON.
CONTROLS = """
import json, sys
sys.path[:0] = [{scripts!r}, {tests!r}]
import triton_compile_check as check  # first: it clears TRITON_INTERPRET before Triton is imported
import triton_compile_grid as grid
import triton_compile_controls as controls
import torch

x = torch.empty(1 << 16)
h = torch.empty(1 << 16, dtype=torch.float16)
cases = [grid.Case(f"transpose {{b}}", lambda b=b: controls._transpose_kernel[(1,)](x, x, BLOCK=b, num_warps=8))
         for b in (128, 256)]
cases.append(grid.Case("invalid dot", lambda: controls._invalid_dot_kernel[(1,)](h, h, BLOCK=8)))
domains = {{
    "_transpose_kernel": {{"BLOCK": (128, 256, 512, 1024), "x_ptr": ("*fp16",)}},
    "_gone_kernel": {{}},
}}
unreachable = {{("_transpose_kernel", "BLOCK", 1024): "a control: listed as unreachable"}}
report = check.run_check(cases, 90, 132, 1, [controls], domains, unreachable)
print(json.dumps({{
    "results": [dict(kernel=check.kernel_name(r.spec), constexprs=r.spec.constexprs, error=r.error,
                     shared=r.shared, regs=r.regs) for r in report.results],
    "failures": report.failures,
}}))
"""


def test_negative_controls_fail(tmp_path):
    code = CONTROLS.format(scripts=str(ROOT / "scripts"), tests=str(ROOT / "tests"))
    out = _run(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    by_case = {(r["kernel"], r["constexprs"].get("BLOCK")): r for r in report["results"]}
    assert set(by_case) == {("_transpose_kernel", 128), ("_transpose_kernel", 256), ("_invalid_dot_kernel", 8)}

    fits = by_case["_transpose_kernel", 128]  # the same kernel at a size that fits: compiled, measured
    assert fits["error"] is None
    assert 0 < fits["shared"] <= 227 * 1024 and fits["regs"] > 0
    too_big = by_case["_transpose_kernel", 256]
    assert too_big["shared"] > 227 * 1024
    assert "shared memory" in too_big["error"] and "sm_90" in too_big["error"]
    invalid = by_case["_invalid_dot_kernel", 8]
    assert invalid["error"].startswith("CompilationError") and "tl.dot" in invalid["error"]

    failures = "\n".join(report["failures"])
    assert "_transpose_kernel {'BLOCK': 256}" in failures and "_invalid_dot_kernel {'BLOCK': 8}" in failures
    coverage = sorted(f for f in report["failures"] if f.startswith("coverage:"))
    assert coverage == sorted([
        "coverage: _never_launched_kernel: never compiled (no case launches it)",
        "coverage: _invalid_dot_kernel.BLOCK: constexpr without a DOMAINS entry (compiled with [8])",
        "coverage: _transpose_kernel.BLOCK: never compiled with [512]",  # 1024 is listed unreachable
        "coverage: _transpose_kernel.x_ptr: never compiled with ['*fp16']",
        "coverage: _transpose_kernel.x_ptr: compiled with ['*fp32'], outside its DOMAINS entry",
        "coverage: _gone_kernel: in DOMAINS but no kernel has that name",
    ])  # and the helpers _row_major (called) and _add (a scan's combine function) are no kernels


def test_one_real_case_compiles(tmp_path):
    """LLaVA-1.5's CLS path (one fused launch) compiles for sm_90 with the venv's Triton."""
    out_json = tmp_path / "results.json"
    out = _run([str(SCRIPT), "--case", "prune(1, 576, 144, score='cls', strategy='rank'", "-j", "1",
                "--json", str(out_json)], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "PASS: Triton" in out.stdout and "_prune_fused_kernel" in out.stdout
    (result,) = json.loads(out_json.read_text())
    assert result["kernel"].endswith(":_prune_fused_kernel") and result["error"] is None
    # The GPU configuration (132 SMs), not the interpreter's: 2 output rows per program.
    assert result["constexprs"]["ROWS_PER_PROGRAM"] == 2 and result["constexprs"]["UNIT_BLOCK"] == 1024
    assert result["regs"] > 0 and result["shared"] > 0


def test_wrong_triton_version_fails(tmp_path):
    out = _run([str(SCRIPT), "--expect-triton", "0.0.0", "--case", "select(1, 1, 1"], tmp_path)
    assert out.returncode == 1 and "FAIL: expected Triton 0.0.0" in out.stdout


def test_gpu_tuning_is_explicit_and_scoped():
    cpu = torch.device("cpu")
    assert not target.for_gpu(cpu)
    with pytest.raises(RuntimeError, match="gpu_tuning"):
        target.sm_count(cpu)
    with target.gpu_tuning(132):
        assert target.for_gpu(cpu) and target.sm_count(cpu) == 132
        with target.gpu_tuning(132):
            assert target.sm_count(cpu) == 132
        with pytest.raises(RuntimeError, match="inside gpu_tuning"):
            with target.gpu_tuning(108):
                pass
        assert target.sm_count(cpu) == 132
    assert not target.for_gpu(cpu)
    with pytest.raises(ValueError, match="sms must be a positive int"):
        with target.gpu_tuning(0):
            pass
