"""Shoal: an LLM serving system — paged-KV engine, cluster scheduler, OpenAI gateway, simulator."""

from shoal.engine.guided import StructuredOutputs
from shoal.engine.sampling_params import SamplingParams
from shoal.llm import LLM, GenerationOutput

__all__ = ["LLM", "GenerationOutput", "SamplingParams", "StructuredOutputs"]
__version__ = "0.1.0"
