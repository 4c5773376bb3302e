"""Runs one vLLM engine on cases.requests() in a process of its own and writes what it saw as JSON.

    python run_engine.py OUT.json '{"tensor_parallel_size": 2, "hf_overrides": {...}}' MODEL_DIR

For what cannot share the test process: tensor parallelism (worker processes, their own CPU binding)
and vLLM without plugins (VLLM_PLUGINS is read once per process). Needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1 to run the recorder in the workers.
"""
import json
import sys

import cases
import recorder


def main(out: str, engine: str, model: str) -> None:
    from vllm import LLM

    llm = LLM(model=model, **{**cases.ENGINE, **json.loads(engine)})
    classes = llm.apply_model(recorder.install)
    parallel = llm.apply_model(recorder.tensor_parallel)
    outputs = cases.generate(llm, cases.requests())
    ranks = llm.apply_model(recorder.collect)
    result = {
        "classes": classes,
        "parallel": parallel,
        "outputs": outputs,
        "idx": [[r["idx"].tolist() for r in records] for records in ranks],
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
