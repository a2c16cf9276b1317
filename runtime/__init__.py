"""xmtf_onnx.runtime: run exported mT0 / BLOOMZ folders with onnxruntime + numpy + tokenizers only."""

from .errors import (ConfigurationError, GenerationInputError, InferenceError, ManifestError,
                     ProviderUnavailableError, UnsupportedModelError, XmtfError)
from .model import GenerationOutput, Model, load

__all__ = ["load", "Model", "GenerationOutput", "XmtfError", "ManifestError", "UnsupportedModelError",
           "ProviderUnavailableError", "GenerationInputError", "InferenceError", "ConfigurationError"]
