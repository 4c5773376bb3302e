"""Adapters that put FoPru pruning into model code.

- `integrations.transformers`: the entry point for Hugging Face transformers, `apply_fopru` /
  `remove_fopru`, for LLaVA (`llava`), LLaVA-NeXT (`llava_next`), Qwen2-VL / Qwen2.5-VL / Qwen3-VL
  (`qwen_vl`), with the CLIP / SigLIP tower tools (`towers`) and placeholder editing (`prompts`).
- `integrations.vllm`: the vLLM plugin (entry point `vllm.general_plugins`).
- `integrations.settings`: the one validator of the settings every integration takes.
Import the submodule you need; nothing here imports a model library eagerly, so the package keeps
torch as its only dependency.
"""
