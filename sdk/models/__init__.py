"""Backbones for federated fine-tuning: a file-free built-in tiny LLaMA and offline loaders.

Why here: every silo and the aggregator must build the same frozen backbone from one config
string; ``load_model`` is that single entry point.
"""

from .builtin import BUILTIN_MODELS, builtin_config, builtin_model
from .byte_tokenizer import ByteTokenizer
from .loading import LoadedModel, ModelLoadError, describe_model, load_model, parse_dtype

__all__ = [
    "BUILTIN_MODELS",
    "ByteTokenizer",
    "LoadedModel",
    "ModelLoadError",
    "builtin_config",
    "builtin_model",
    "describe_model",
    "load_model",
    "parse_dtype",
]
