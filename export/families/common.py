"""Helpers shared by the family modules."""

from __future__ import annotations

import numpy as np


def weights_of(model) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays, by their PyTorch names."""
    return {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()}


def cache_fields(num_layers: int, num_heads: int, head_dim: int) -> dict:
    """The self-attention KV cache contract: recorded, never derived by the runtime."""
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "axes": ["batch", "heads", "sequence", "head_dim"],
        "past_key": "past_key.{layer}",
        "past_value": "past_value.{layer}",
        "present_key": "present_key.{layer}",
        "present_value": "present_value.{layer}",
        "reorder_input": "beam_idx",
    }


def compare(onnx_value: np.ndarray, torch_value, where: np.ndarray | None = None) -> dict[str, float]:
    """Max abs difference and the reference's max abs value (the scale the tolerance is relative to)."""
    reference = torch_value.detach().numpy() if hasattr(torch_value, "detach") else np.asarray(torch_value)
    if onnx_value.shape != reference.shape:
        return {"max_abs_diff": float("inf"), "max_abs_reference": 0.0,
                "error": f"shape {list(onnx_value.shape)} != PyTorch's {list(reference.shape)}"}
    difference = np.abs(onnx_value.astype(np.float64) - reference.astype(np.float64))
    magnitude = np.abs(reference.astype(np.float64))
    if where is not None:
        difference, magnitude = difference[where], magnitude[where]
    if not difference.size:
        return {"max_abs_diff": 0.0, "max_abs_reference": 0.0}
    return {"max_abs_diff": float(difference.max()), "max_abs_reference": float(magnitude.max())}
