"""The one place InferenceSessions are made."""

from __future__ import annotations

import warnings

import onnxruntime as ort

from .errors import ManifestError, ProviderUnavailableError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_provider(provider: str) -> str:
    """'cpu' / 'cuda' (or the full onnxruntime name) -> the onnxruntime provider name, if installed."""
    if not isinstance(provider, str):
        raise ProviderUnavailableError(f"provider must be 'cpu' or 'cuda', not {provider!r}")
    name = PROVIDERS.get(provider.lower(), provider)
    if name not in PROVIDERS.values():
        raise ProviderUnavailableError(f"unknown provider {provider!r}; choose 'cpu' or 'cuda'.")
    available = ort.get_available_providers()
    if name not in available:
        hint = " Install the gpu extra: pip install 'xmtf-onnx[gpu]'." if name == PROVIDERS["cuda"] else ""
        raise ProviderUnavailableError(
            f"provider {provider!r} is not available in this onnxruntime (available: {', '.join(available)}).{hint}"
        )
    return name


def make_session(path: str, provider: str = "cpu", threads: int | None = None,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An InferenceSession on one provider, full graph optimizations, `threads` intra-op threads. Given `options`
    are used as they are (but for `threads`)."""
    provider_name = resolve_provider(provider)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ProviderUnavailableError(f"threads must be a positive integer, not {threads!r}")
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Memory patterns pay off for fixed shapes; here every decode step has a new one (the cache grows),
        # and the per-shape blocks cost 0.3 GB of peak memory at 8x4 beams on bloomz-560m.
        options.enable_mem_pattern = False
        # A model runs several sessions one after another (decoder, head, screen), each with its own pool.
        # Spinning keeps the decoder's ~200 small ops from waiting for their threads to wake; stopping it when
        # a run ends keeps an idle pool from taking the cores of the next session (measured on 2 cores:
        # mt0-small fp32 greedy 63 tokens/s with pools left spinning, 116 with spinning stopped).
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = [provider_name] if provider_name == "CPUExecutionProvider" else [provider_name,
                                                                                 "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise ManifestError(f"onnxruntime could not load {path}: {e}. Export the model again.") from e
    if provider_name not in session.get_providers():
        warnings.warn(f"{provider_name} was requested but onnxruntime fell back to {session.get_providers()}",
                      RuntimeWarning, stacklevel=2)
    return session
