"""Export errors: the runtime's hierarchy, plus what only export can get wrong."""

from xmtf_onnx.runtime.errors import UnsupportedModelError, XmtfError

__all__ = ["ExportError", "OutputExistsError", "ModelLoadError", "UnsupportedModelError", "ValidationError"]


class ExportError(XmtfError):
    """Export could not finish; nothing was written at the output path."""


class OutputExistsError(ExportError, ValueError):
    """The output folder exists and --force was not given."""


class ModelLoadError(ExportError, ValueError):
    """The model id, folder or checkpoint could not be read."""


class ValidationError(ExportError):
    """The ONNX graphs disagree with PyTorch by more than the tolerance."""
