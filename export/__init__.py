"""xmtf_onnx.export: mT0 / BLOOMZ checkpoints -> self-describing ONNX folders (needs the `export` extra)."""

from .errors import ExportError, ModelLoadError, OutputExistsError, UnsupportedModelError, ValidationError
from .exporter import export
from .presets import PRESETS

__all__ = ["export", "PRESETS", "ExportError", "ModelLoadError", "OutputExistsError", "UnsupportedModelError",
           "ValidationError"]
