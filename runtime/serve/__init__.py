"""`xmtf-onnx serve`: an OpenAI-compatible HTTP server over one exported model (the serve extra).

Imported only by the serve command and by services that mount the app; `import xmtf_onnx.runtime` never imports it.
"""

from .app import Limits, Server, build_app

__all__ = ["Limits", "Server", "build_app"]
