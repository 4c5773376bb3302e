"""Smoke test of the serving benchmarks (`python -m benchmarks.serving`, benchmarks/serving*.py).

On a CPU the benchmark runs every section with tiny shapes and a host timer: this proves that each
benchmark function runs end to end, that each comparison compares like with like (the q/k op
scores as the oracle does, the ragged op keeps the per-image loop's rows, the LLaVA prompt shrinks
by the pruned tokens), that the traffic it reports counts the real tensors, and that the report
holds a row for every record, so `scripts/gpu_check.sh` does not discover a broken harness on the
device. It measures nothing.
"""
import json
import re

import pytest
import torch

import fopru_kernels as F
from benchmarks import serving, serving_plan, serving_qk, serving_qwen, serving_varlen
from benchmarks.reporting import has_error

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a loaded shared CPU: a second OpenMP thread only adds scheduling waits, which can
    make a tiny Linear many times slower than on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_plan_has_the_llava_15_shapes():
    for quick in (False, True):
        plan = serving_plan.gpu_plan(quick)
        assert (plan.qk.H, plan.qk.S, plan.qk.d, plan.qk.D, plan.qk.keep) == (16, 577, 64, 1024, 144)
        assert 32 in plan.qk.batches
        assert set(plan.llava.keeps) <= {576, 288, 144, 64} and 576 in plan.llava.keeps and 1 in plan.llava.batches
    full = serving_plan.gpu_plan(False)
    assert full.qk.batches == (1, 32)
    assert (full.llava.batches, full.llava.keeps) == ((1, 8), (576, 288, 144, 64))
    assert full.llava.vision["image_size"] // full.llava.vision["patch_size"] == 24  # 576 patches
    assert (full.llava.text["hidden_size"], full.llava.text["num_hidden_layers"]) == (4096, 32)


def test_gpu_plan_has_the_qwen25_vl_7b_shapes():
    for quick in (False, True):
        q = serving_plan.gpu_plan(quick).qwen
        assert (q.hidden, q.heads, q.hidden // q.heads, q.intermediate, q.merged_dim, q.group) == (1280, 16, 80, 3420, 3584, 4)
        assert len(q.grids) == 8 and len(set(q.sizes)) == 8  # 8 images of mixed sizes
        assert all(r % 2 == 0 and c % 2 == 0 for r, c in q.grids)  # whole 2 x 2 merge units
        assert q.keeps == [n // 16 for n in q.sizes]  # a quarter of the merged tokens


def test_qwen_block_attends_within_each_image():
    """The block's attention (per-image SDPA here; FlashAttention varlen on a GPU) against a direct
    softmax per image, and its lse against logsumexp: the 'lse given' variant passes the right thing."""
    shape = serving_plan.tiny_plan(True).qwen
    torch.manual_seed(0)
    block = serving_qwen.VisionBlock(shape).eval()
    sizes = shape.sizes
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
    cos, sin = serving_qwen.rotary(shape, CPU, torch.float32)
    x = torch.randn(sum(sizes), shape.hidden)
    with torch.no_grad():
        qkv = block.qkv_of(x, cos, sin)
        out, lse, _ = serving_qwen.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max(sizes))
        assert block(x, cu, max(sizes), cos, sin).shape == x.shape
    d = shape.hidden // shape.heads
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = (qkv[a:b, i].transpose(0, 1) for i in range(3))
        logits = q @ k.transpose(-1, -2) * d**-0.5
        assert torch.allclose(out[a:b].transpose(0, 1), logits.softmax(-1) @ v, atol=1e-5)
        assert torch.allclose(lse[:, a:b], logits.logsumexp(-1), atol=1e-5)


@pytest.mark.parametrize("plan", [serving_plan.gpu_plan(False), serving_plan.tiny_plan(False)], ids=["gpu", "tiny"])
def test_varlen_dense_comparison_has_the_same_total(plan):
    shape = plan.varlen
    b, (rows, cols) = len(shape.grids), shape.dense_grid
    assert b == 8
    assert sum(shape.sizes) == b * rows * cols
    assert sum(shape.keeps) == b * shape.dense_keep
    assert len(set(shape.sizes)) > 2  # mixed sizes


def test_sdpa_lse_is_the_natural_log_row_logsumexp():
    q, k, v = torch.randn(3, 2, 2, 17, 8).unbind(0)
    out, lse, source = serving_qk.sdpa_with_lse(q, k, v)
    assert lse.shape == (2, 2, 17) and lse.dtype == torch.float32
    assert serving_qk.lse_error(q, k, lse) < 1e-3, source
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)


def _records_have_no_error(obj) -> bool:
    return not has_error(obj)


def _has_row(report: str, *cells) -> bool:
    """Whether the markdown holds a table row starting with these cells."""
    head = r"\| " + r" \| ".join(re.escape(str(c)) for c in cells) + r" \|"
    return re.search("^" + head, report, re.M) is not None


def test_every_section_runs_on_cpu_and_reports(tmp_path):
    assert serving.main(["--out", str(tmp_path), "--device", "cpu", "--quick"]) == 0
    data = json.loads((tmp_path / "serving.json").read_text())
    report = (tmp_path / "serving.md").read_text()
    plan = serving_plan.tiny_plan(quick=True)
    backends = serving_plan.backends_for(CPU)

    env = data["environment"]
    assert env["device_type"] == "cpu" and env["backends"] == backends
    assert env["command"].startswith("python -m benchmarks.serving")
    assert set(env["kernels"]) == set(serving.SERVING_OPS)

    qk = data["qk"]
    assert _records_have_no_error(qk)
    assert qk["lse_max_err"] < 1e-3
    for b in plan.qk.batches:
        sdpa = [r for r in qk["records"] if r["op"] == "sdpa" and r["B"] == b]
        assert len(sdpa) == 1 and sdpa[0]["us"] > 0
        for label, *_ in serving_qk.QK_VARIANTS:
            for backend in backends:
                for op in ("significance_qk", "prune_tokens_qk"):
                    (rec,) = [r for r in qk["records"] if (r["B"], r["op"], r["variant"], r["backend"]) == (b, op, label, backend)]
                    assert rec["us"] > 0 and rec["pct_sdpa"] == pytest.approx(100 * rec["us"] / sdpa[0]["us"])
                    assert rec["sig_max_err"] < 1e-3  # the harness passes the oracle's arguments
                    assert _has_row(report, b, op, label, backend)
        assert _has_row(report, b, "**SDPA**")
    assert [m["B"] for m in qk["memory"]] == list(plan.qk.batches)
    for m in qk["memory"]:
        assert len(m["rows"]) == len(serving_qk.QK_VARIANTS) * len(backends)
        assert all(r["map_path_bytes"] is None for r in m["rows"])  # no allocator peak on a CPU

    varlen = data["varlen"]
    assert _records_have_no_error(varlen)
    assert [(r["strategy"], r["backend"]) for r in varlen["records"]] == [
        (s, b) for s in ("rank", "row") for b in backends
    ]
    for r in varlen["records"]:
        assert all(r[name]["us"] > 0 for name in ("varlen", "dense", "loop"))
        assert r["ratio_dense"] == pytest.approx(r["varlen"]["us"] / r["dense"]["us"])
        assert r["loop_same_kept"] is True  # the loop it is compared with keeps the op's rows
        assert _has_row(report, r["strategy"], r["backend"])
    # The reported traffic is the real tensors': sig read once, the kept rows read and written.
    sets, cu = serving_varlen.varlen_sets(plan.varlen, CPU)
    tokens, sig = sets[0]
    pruned = F.prune_tokens_varlen(tokens, sig, cu, plan.varlen.keeps)[0]
    assert varlen["traffic_bytes"] == sig.nbytes + 2 * pruned.nbytes
    assert varlen["dense"]["B"] * varlen["dense"]["keep"] == pruned.shape[0]  # dense keeps as many rows

    llava = data["llava"]
    if "skipped" in llava:
        pytest.importorskip("transformers")  # skipped only when transformers is missing
    assert _records_have_no_error(llava)
    n_image = (plan.llava.vision["image_size"] // plan.llava.vision["patch_size"]) ** 2
    for b in plan.llava.batches:
        rows = [r for r in llava["records"] if r["B"] == b]
        assert [r["keep"] for r in rows] == [None, *plan.llava.keeps]
        for r in rows[1:]:
            assert r["image_tokens_per_row"] == [r["keep"]]  # the language model gets `keep` image tokens
            assert r["seq_len"] == rows[0]["seq_len"] - (n_image - r["keep"])  # and the prompt shrinks by the rest
            assert r["ttft_us"] > 0 and r["prune"]["us"] > 0
            assert r["prune_share_pct"] == pytest.approx(100 * r["prune"]["us"] / r["ttft_us"])
        assert all(_has_row(report, b, "none (all)" if r["keep"] is None else r["keep"]) for r in rows)

    qwen = data["qwen"]
    assert _records_have_no_error(qwen)
    assert qwen["block"]["us"] > 0 and qwen["attn"]["us"] > 0 and qwen["sizes"] == plan.qwen.sizes
    assert [(r["variant"], r["backend"]) for r in qwen["records"]] == [
        (label, b) for label, *_ in serving_qwen.QWEN_VARIANTS for b in backends
    ]
    for r in qwen["records"]:
        assert r["us"] > 0 and r["pct_block"] == pytest.approx(100 * r["us"] / qwen["block"]["us"])
        assert r["sig_max_err"] < 1e-3  # the harness passes the oracle's arguments
        assert _has_row(report, r["variant"], r["backend"])

    for heading in ("## 1. Significance from q and k", "## 2. Ragged batches", "## 3. LLaVA", "## 4. Packed q/k"):
        assert heading in report
    assert "n/a (CPU smoke run)" in report and "| error" not in report


def test_a_failing_measurement_is_reported_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(F, "prune_tokens_varlen", broken)
    res = serving_varlen.bench_varlen(serving_plan.tiny_plan(True), CPU, serving_plan.backends_for(CPU), copy_bps=1e10)
    assert all(r["varlen"]["error"] == "RuntimeError: kernel exploded" for r in res["records"])
    assert all("us" in r["dense"] for r in res["records"])
    assert has_error(res)
    env = {"device": "cpu", "device_type": "cpu", "torch": "t", "cuda": None, "triton": "t", "python": "3",
           "date": "d", "command": "c", "backends": ["cpu"], "copy_GBps": 10.0, "kernels": {}}
    assert "| error |" in serving.markdown(env, {"varlen": res}, [])
