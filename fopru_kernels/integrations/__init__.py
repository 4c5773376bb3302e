"""Adapters that put FoPru pruning into model code.

`fopru_kernels.integrations.transformers`: Hugging Face transformers (CLIP / SigLIP vision towers,
LLaVA, LLaVA-NeXT); its `apply_fopru` also serves Qwen2-VL, Qwen2.5-VL and Qwen3-VL through
`fopru_kernels.integrations.qwen_vl`. Import the submodule you need; nothing here imports a model
library eagerly, so the package keeps torch as its only dependency.
"""
