"""Section 3 of the serving report: a LLaVA-1.5-7B-shaped model with random fp16 weights, time to first
token at several `keep` through the transformers adapter, and the share of it spent pruning."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

import fopru_kernels

from .reporting import dtype_name, fmt, md_table, progress_line, status_cell
from .serving_plan import LlavaShape, Plan
from .timing import Timing, eager_loop_us, error_text, measure, sync

LLAVA_TARGET_SHARE_PCT = 0.5  # pruning share of time to first token at B=1
LLAVA_SCORE, LLAVA_KIND, LLAVA_STRATEGY = "focal", "logit", "rank"  # FoPru's own scoring


def build_llava(shape: LlavaShape, device: torch.device):
    """LlavaForConditionalGeneration from a config in code, random weights, fp16 on a GPU (float32 on
    a CPU), built directly on `device` so the random init runs there."""
    import transformers

    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**shape.vision),
        text_config=transformers.LlamaConfig(**shape.text),
        image_token_id=shape.image_token_id,
        image_seq_length=(shape.vision["image_size"] // shape.vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def llava_inputs(model, shape: LlavaShape, batch: int, device: torch.device) -> dict:
    """One prompt per image, as the LLaVA-1.5 processor lays it out: BOS, text, N image placeholders,
    text; all rows the same length (no padding)."""
    config = model.config
    n = config.image_seq_length
    gen = torch.Generator().manual_seed(batch)
    before = shape.text_tokens // 4
    text = torch.randint(3, shape.image_token_id, (batch, shape.text_tokens), generator=gen)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), text[:, :before],
         torch.full((batch, n), shape.image_token_id), text[:, before:]], dim=1,
    )
    size = shape.vision["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=gen).to(device, model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "pixel_values": pixels}


def fopru_on(model, keep: int, inputs: dict) -> dict:
    """The adapter call: FoPru on `model` keeping `keep` image tokens per image; returns the inputs
    with `keep` placeholders per image (the adapter's own placeholder trimming)."""
    from fopru_kernels.integrations.transformers import apply_fopru

    handle = apply_fopru(model, keep=keep, strategy=LLAVA_STRATEGY, score=LLAVA_SCORE, kind=LLAVA_KIND)
    return handle.prepare_inputs(inputs)


def fopru_off(model) -> None:
    from fopru_kernels.integrations.transformers import remove_fopru

    remove_fopru(model)


def first_token(model, inputs: dict) -> torch.Tensor:
    """The prefill that produces the first token: one forward with a KV cache, logits of the last
    position only (as generate() computes them), greedy pick."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(dim=-1)


def wall_us(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median host wall µs of fn() from a drained device to its result on the device."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def prune_alone(model, inputs: dict, keep: int, device: torch.device, timing: Timing) -> dict:
    """The prune op alone on the inputs it gets inside the model: q, k and the features of the
    vision layer LLaVA feeds the projector, captured from one tower pass, with the adapter's arguments.
    'us': eager µs per call in a Python loop on a GPU (what the op adds to a forward: host issue or
    GPU time, the larger), host median on a CPU; 'graph_us': GPU time alone."""
    from fopru_kernels.integrations.transformers import QKCapture, num_prefix_tokens

    tower = model.model.vision_tower
    p = num_prefix_tokens(tower)
    with torch.no_grad(), QKCapture(tower, model.config.vision_feature_layer) as cap:
        tower(pixel_values=inputs["pixel_values"])
    features, q, k, scale = cap.hidden[:, p:], cap.q, cap.k, cap.scale

    def call():
        return fopru_kernels.prune_tokens_qk(features, q, k, keep, strategy=LLAVA_STRATEGY, score=LLAVA_SCORE,
                                             num_prefix=p, scale=scale, kind=LLAVA_KIND, layout="bshd")

    rec = measure(call, [()], device, timing)  # one set: inside the model q, k and features are fresh in L2
    if device.type == "cuda":
        rec["graph_or_events_us"] = rec["us"]
        rec["us"] = rec["eager_loop_us"] = eager_loop_us(call, [()], max(20, rec["reps"]))
    return rec


def bench_llava(plan: Plan, device: torch.device) -> dict:
    """Section 3: time to first token with FoPru at each keep (and without it), and the prune share."""
    shape = plan.llava
    try:
        import transformers
    except ImportError as e:
        return {"skipped": f"transformers not installed ({e})", "records": [], "notes": []}
    result: dict = {"transformers": transformers.__version__, "score": LLAVA_SCORE, "kind": LLAVA_KIND,
                    "strategy": LLAVA_STRATEGY, "text_tokens": shape.text_tokens, "records": [], "notes": []}
    t0 = time.perf_counter()
    model = build_llava(shape, device)
    sync(device)
    result["init_s"] = time.perf_counter() - t0
    result["params"] = sum(p.numel() for p in model.parameters())
    result["dtype"] = dtype_name(model.dtype)
    print(f"llava: {result['params'] / 1e6:,.1f} M parameters built in {result['init_s']:.1f} s", flush=True)
    with torch.no_grad():
        for b in shape.batches:
            full = llava_inputs(model, shape, b, device)
            none_us = wall_us(partial(first_token, model, full), device, shape.warmup, shape.reps)
            result["records"].append({"B": b, "keep": None, "ttft_us": none_us, "seq_len": full["input_ids"].shape[1]})
            print(f"llava B={b} no FoPru: TTFT {none_us / 1e3:8.2f} ms", flush=True)
            for keep in shape.keeps:
                rec: dict = {"B": b, "keep": keep}
                try:
                    inputs = fopru_on(model, keep, full)
                    try:
                        placeholders = (inputs["input_ids"] == shape.image_token_id).sum(dim=1)
                        rec["image_tokens_per_row"] = sorted(set(placeholders.tolist()))
                        rec["seq_len"] = inputs["input_ids"].shape[1]
                        rec["ttft_us"] = wall_us(partial(first_token, model, inputs), device, shape.warmup, shape.reps)
                    finally:
                        fopru_off(model)
                    prune = prune_alone(model, full, keep, device, plan.timing)
                    rec["prune"] = prune
                    rec["prune_share_pct"] = 100.0 * prune["us"] / rec["ttft_us"]
                    rec["speedup_vs_none"] = none_us / rec["ttft_us"]
                except Exception as e:
                    rec["error"] = error_text(e)
                result["records"].append(rec)
                print(_llava_progress(rec), flush=True)
    return result  # the model is freed here; main empties the CUDA cache after each section


def _llava_progress(rec: dict) -> str:
    return progress_line(f"llava B={rec['B']} keep={rec['keep']:<4}", rec, lambda r: (
        f"TTFT {r['ttft_us'] / 1e3:8.2f} ms, prune {r['prune']['us']:8.1f} us ({r['prune_share_pct']:.3f}%)"))


def llava_markdown(res: dict, gpu: bool) -> list[str]:
    lines = ["## 3. LLaVA-1.5-7B-shaped model end to end", ""]
    if "skipped" in res:
        return lines + [f"skipped: {res['skipped']}"]
    lines += [
        f"LlavaForConditionalGeneration, {res['params'] / 1e6:,.1f} M random {res['dtype']} parameters "
        f"(built in {res['init_s']:.1f} s), transformers {res['transformers']}, SDPA. Prompt: BOS + "
        f"{res['text_tokens']} text tokens + the image placeholders. TTFT: host wall time of one prefill "
        "forward with KV cache and last-position logits + greedy pick (median). FoPru through "
        f"`apply_fopru(keep, strategy='{res['strategy']}', score='{res['score']}', kind='{res['kind']}')`. "
        "prune: prune_tokens_qk alone on the captured q, k and features of that image batch"
        + (", µs per call of back-to-back eager calls (host issue or GPU, the larger); GPU-only time in 'prune GPU µs'."
           if gpu else ", host timer."),
        "",
    ]
    rows = []
    for r in res["records"]:
        if r["keep"] is None:
            rows.append([str(r["B"]), "none (all)", str(r["seq_len"]),
                         f"{r['ttft_us'] / 1e3:.2f}", "—", "—", "—", "—", "—"])
        elif "error" in r:
            rows.append([str(r["B"]), str(r["keep"]), "", f"error: {r['error']}", "", "", "", "", ""])
        else:
            limit_row = r["B"] == 1
            rows.append([str(r["B"]), str(r["keep"]), str(r["seq_len"]), f"{r['ttft_us'] / 1e3:.2f}",
                         fmt(r["speedup_vs_none"], ".2f"), f"{r['prune']['us']:.1f}",
                         fmt(r["prune"].get("graph_or_events_us"), ".1f"), f"{r['prune_share_pct']:.3f}",
                         status_cell(r["prune_share_pct"], LLAVA_TARGET_SHARE_PCT, gpu) if limit_row else "—"])
    lines += md_table(["B", "keep", "seq len", "TTFT ms", "× no FoPru", "prune µs", "prune GPU µs", "prune % TTFT",
                     f"target < {LLAVA_TARGET_SHARE_PCT}% at B=1"], rows)
    return lines + [f"- {n}" for n in res["notes"]]
