"""One hierarchy for every error xmtf-onnx raises on purpose."""


class XmtfError(Exception):
    """Base of every xmtf-onnx error."""


class ManifestError(XmtfError, ValueError):
    """The exported folder is missing, corrupted, or not what this runtime can read."""


class UnsupportedModelError(XmtfError, ValueError):
    """The model type or setting is not one xmtf-onnx handles."""


class ProviderUnavailableError(XmtfError, ValueError):
    """The requested onnxruntime execution provider is not installed or not known."""


class ConfigurationError(XmtfError, ValueError):
    """An environment setting of the runtime's (XMTF_ONNX_*) has a value it does not know."""


class GenerationInputError(XmtfError, ValueError):
    """A prompt, token id or generation option is out of range."""


class InferenceError(XmtfError, RuntimeError):
    """onnxruntime failed while running a graph."""
