"""FoPru in vLLM: a general plugin (entry point `vllm.general_plugins` -> `register`).

vLLM runs `register()` in every process it starts. It replaces the model classes of the supported
architectures (`ARCHITECTURES`) by subclasses that prune image tokens when, and only when, the
model's config carries a `fopru` dict (`hf_overrides={"fopru": {...}}`, CLI `--hf-overrides`):
without it they are the stock classes, unchanged in behaviour. The classes are registered lazily
(`"module:Class"`), so a process that never loads such a model never imports them.

Settings are checked when vLLM resolves the model's architecture (it builds its ModelConfig, at
engine start), by the processing info and by the model's constructor, so a bad setting or an
unsupported architecture stops the engine at start with one ValueError naming the key.

Families: LLaVA-1.5 (`llava.py`), LLaVA-NeXT (`llava_next.py`), Qwen2-VL / Qwen2.5-VL / Qwen3-VL
(`qwen_models.py` on `qwen_vl.py`, positions in `mrope.py`). Adding one: write its subclass, with a
`fopru_plan(hf_config)` classmethod that validates the settings against the model's config, and add its
architecture here.
"""
from __future__ import annotations

import importlib

# Architecture name -> "module:Class" of the subclass that prunes when the config asks for it.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "fopru_kernels.integrations.vllm.llava:FoPruLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": (
        "fopru_kernels.integrations.vllm.llava_next:FoPruLlavaNextForConditionalGeneration"
    ),
    **{
        arch: f"fopru_kernels.integrations.vllm.qwen_models:FoPru{arch}"
        for arch in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                     "Qwen3VLForConditionalGeneration")
    },
}


def plan_for(hf_config, architecture: str):
    """The model's prune plan for `hf_config` (None without a `fopru` key). Raises ValueError for a
    bad setting, or for settings given to an architecture the plugin does not support."""
    if getattr(hf_config, "fopru", None) is None:
        return None
    target = ARCHITECTURES.get(architecture)
    if target is None:
        raise ValueError(
            f"fopru: the FoPru plugin does not support architecture {architecture!r}; supported: "
            f"{', '.join(repr(a) for a in ARCHITECTURES)} (vLLM's own implementation, model_impl='auto' or "
            "'vllm'); remove the 'fopru' key to serve this model unpruned"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name).fopru_plan(hf_config)


def _checked(inspect_model_cls):
    """Wraps ModelRegistry.inspect_model_cls, which ModelConfig calls once it has the HF config
    (overrides applied): configs with a `fopru` key are validated there, configs without one pass
    through untouched."""

    def inspect(architectures, model_config):
        info, arch = inspect_model_cls(architectures, model_config)
        plan_for(model_config.hf_config, arch)
        return info, arch

    inspect.fopru_checked = True
    return inspect


def register() -> None:
    """The plugin's entry point: registers the subclasses and the start-time settings check.
    Idempotent (vLLM may load plugins more than once in a process)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    if not getattr(ModelRegistry.inspect_model_cls, "fopru_checked", False):
        # An instance attribute shadows the method on vLLM's one registry object.
        ModelRegistry.inspect_model_cls = _checked(ModelRegistry.inspect_model_cls)
