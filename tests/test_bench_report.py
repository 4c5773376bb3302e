"""Smoke test of the map-path benchmark report (`python -m benchmarks.report`, benchmarks/report.py).

The report runs here end to end on tiny shapes (its own LLaVA-1.5 shapes take minutes on a CPU):
every backend and baseline of this install on CPU tensors, timed with a host timer. It measures
nothing; it checks what the report is for: the fused backends return the reference's bits, the
baselines keep the reference's tokens, the traffic and bandwidth are computed from the real
tensor sizes, and report.md holds a row for every record, so `scripts/gpu_check.sh` does not
discover a broken harness on the device.
"""
import json
import re

import pytest
import torch

import fopru_kernels as F
from benchmarks import baselines, report
from benchmarks.prune_cases import FUSED, BenchCase, make_inputs
from benchmarks.timing import Timing
from fopru_kernels import reference

CPU = torch.device("cpu")
# LLaVA-1.5 by name (the plot draws that model) at a size a CPU runs in a moment.
CASES = [
    BenchCase("LLaVA-1.5", "cls", 1, N=16, H=2, D=8, keep=5),
    BenchCase("LLaVA-1.5", "cls", 3, N=16, H=2, D=8, keep=5),
    BenchCase("LLaVA-1.5", "focal", 2, N=16, H=3, D=8, keep=4),
]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(report, "bench_cases", lambda quick: CASES)
    monkeypatch.setattr(report, "timing_for", lambda device, quick: Timing(0.001, 1, 2, 0))
    monkeypatch.setattr(report, "copy_bytes_for", lambda device: 1 << 20)


def _row(md: str, *cells) -> list[str]:
    """The cells of the table row that starts with these cells (asserts there is exactly one)."""
    head = r"\| " + r" \| ".join(re.escape(str(c)) for c in cells) + r" \|"
    rows = [ln for ln in md.splitlines() if re.match(head, ln)]
    assert len(rows) == 1, (cells, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_runs_on_cpu_and_checks_what_it_times(tmp_path, tiny):
    assert report.main(["--out", str(tmp_path), "--device", "cpu", "--quick"]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    env, records = data["environment"], data["records"]
    assert env["command"] == f"python -m benchmarks.report --out {tmp_path} --device cpu --quick"
    assert f"- command: `{env['command']}`" in md
    copy_bps = env["copy_GBps"] * 1e9

    fused = [b for b in FUSED if b in F.available_backends(CPU)]
    for case in CASES:
        recs = {r["backend"]: r for r in records if (r["score"], r["B"]) == (case.score, case.B)}
        want = ["reference", *fused, "published_loop"] + (["eager_cls_chain"] if case.score == "cls" else [])
        assert sorted(recs) == sorted(want)
        tokens, attn = make_inputs(case, CPU, torch.float16, torch.float16, 0)
        pruned, _ = reference.prune_tokens(tokens, attn, case.keep, score=case.score, num_prefix=case.num_prefix)
        traffic = attn.nbytes + 2 * pruned.nbytes  # attention read once, kept rows read and written
        floor = _row(md, case.model, case.score, case.B, "*bandwidth floor*")
        assert float(floor[4]) == pytest.approx(traffic / copy_bps * 1e6, abs=0.051)
        for name, r in recs.items():
            assert "error" not in r, r
            assert r["traffic_bytes"] == traffic and r["floor_us"] == pytest.approx(traffic / copy_bps * 1e6)
            assert r["gbps"] == pytest.approx(traffic / (r["median_us"] * 1e-6) / 1e9)
            agrees = _row(md, case.model, case.score, case.B, name)[-2]
            if name in fused:
                assert r["exact"] is True and agrees == "yes"
                assert set(r["speedup"]) >= {"reference", "published_loop"}
                assert r["speedup"]["reference"] == pytest.approx(recs["reference"]["median_us"] / r["median_us"])
            elif name != "reference":
                assert r["same_kept"] is True and agrees == "yes"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_a_baseline_that_keeps_other_tokens_is_flagged(tmp_path, tiny, monkeypatch):
    def wrong(tokens, attn, keep, score="focal", num_prefix=1):
        pruned, idx = reference.prune_tokens(tokens, attn, keep, score=score, num_prefix=num_prefix)
        return pruned, (idx + 1) % tokens.shape[1]  # shifted by one token: not a near-tie

    monkeypatch.setattr(baselines, "published_loop", wrong)
    report.main(["--out", str(tmp_path), "--device", "cpu", "--quick"])
    md = (tmp_path / "report.md").read_text()
    assert _row(md, "LLaVA-1.5", "focal", 2, "published_loop")[-2] == "**NO**"
    assert "published_loop: keeps other tokens than the reference beyond near-ties" in md


def test_same_kept_allows_near_ties_only():
    sig = torch.tensor([[100, 90, 80, 79, 10, 0], [5, 4, 3, 2, 1, 0]]) * 1_000_000
    exact = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert baselines.same_kept(exact, exact, sig)
    near = sig.clone()
    near[0, 3] = near[0, 2] - 1  # tokens 2 and 3 tie within float rounding: either may be kept
    assert baselines.same_kept(torch.tensor([[0, 1, 3], [0, 1, 2]]), exact, near)
    assert not baselines.same_kept(torch.tensor([[0, 1, 3], [0, 1, 2]]), exact, sig)  # 80 vs 79: a real gap
    assert not baselines.same_kept(torch.tensor([[0, 1, 2], [0, 1, 5]]), exact, sig)
    assert not baselines.same_kept(exact[:, :2], exact, sig)
