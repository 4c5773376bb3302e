"""Adapters that put FoPru pruning into model code.

`fopru_kernels.integrations.transformers`: Hugging Face transformers (CLIP / SigLIP vision towers,
LLaVA). Import the submodule you need; nothing here imports a model library eagerly, so the
package keeps torch as its only dependency.
"""
