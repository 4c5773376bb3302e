"""vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL classes with FoPru (`qwen_vl.py` has the mechanism): each a
processing info, a multimodal processor and a model class, registered together, the FoPru mixin first.
Without a `fopru` key in the config every one of them is vLLM's own class in behaviour."""
from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen_vl import FoPruQwenModel, FoPruQwenMultiModalProcessor, FoPruQwenProcessingInfo


class FoPruQwen2VLProcessingInfo(FoPruQwenProcessingInfo, Qwen2VLProcessingInfo):
    pass


class FoPruQwen2VLMultiModalProcessor(FoPruQwenMultiModalProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FoPruQwen2VLMultiModalProcessor, info=FoPruQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class FoPruQwen2VLForConditionalGeneration(FoPruQwenModel, Qwen2VLForConditionalGeneration):
    pass


class FoPruQwen2_5_VLProcessingInfo(FoPruQwenProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class FoPruQwen2_5_VLMultiModalProcessor(FoPruQwenMultiModalProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FoPruQwen2_5_VLMultiModalProcessor, info=FoPruQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class FoPruQwen2_5_VLForConditionalGeneration(FoPruQwenModel, Qwen2_5_VLForConditionalGeneration):
    pass


class FoPruQwen3VLProcessingInfo(FoPruQwenProcessingInfo, Qwen3VLProcessingInfo):
    pass


class FoPruQwen3VLMultiModalProcessor(FoPruQwenMultiModalProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FoPruQwen3VLMultiModalProcessor, info=FoPruQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class FoPruQwen3VLForConditionalGeneration(FoPruQwenModel, Qwen3VLForConditionalGeneration):
    pass
