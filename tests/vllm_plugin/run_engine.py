"""Runs one vLLM engine on a suite's requests in a process of its own and writes what it saw as JSON.

    python run_engine.py OUT.json '{"tensor_parallel_size": 2, "hf_overrides": {...}}' MODEL_DIR [SUITE]

SUITE: 'llava' (default: cases.requests(), recorder.py) or 'qwen:FAMILY' (qwen_cases.requests(FAMILY),
qwen_recorder.py). For what cannot share the test process: tensor parallelism (worker processes, their
own CPU binding) and vLLM without plugins (VLLM_PLUGINS is read once per process). Needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1 to run the recorder in the workers.
"""
import json
import sys

import cases


def main(out: str, engine: str, model: str, suite: str = "llava") -> None:
    from vllm import LLM

    if suite == "llava":
        import recorder

        defaults, requests, generate = cases.ENGINE, cases.requests(), cases.generate
    else:
        import qwen_cases
        import qwen_recorder as recorder

        defaults, requests, generate = qwen_cases.ENGINE, qwen_cases.requests(suite.split(":")[1]), qwen_cases.generate
    llm = LLM(model=model, **{**defaults, **json.loads(engine)})
    classes = llm.apply_model(recorder.install)
    parallel = llm.apply_model(recorder.tensor_parallel)
    outputs = generate(llm, requests)
    ranks = llm.apply_model(recorder.collect)
    if suite == "llava":
        kept = [[r["idx"].tolist() for r in records] for records in ranks]
    else:
        family = suite.split(":")[1]
        kept = [qwen_cases.kept_per_run(family, records["kept"]) for records in ranks]
    result = {"classes": classes, "parallel": parallel, "outputs": outputs, "idx": kept}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
