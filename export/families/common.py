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


def output_graphs(hidden_size: int, weight: np.ndarray, weight_name: str, weight_file) -> list:
    """The head (hidden -> logits) and the greedy screen over the same fp32 output projection [V, d]."""
    from ..screen import build_head, build_screen

    vocab = weight.shape[0]
    return [(build_head(hidden_size, vocab, weight, weight_name, weight_file), "head.onnx", "head"),
            (build_screen(weight, weight_name, weight_file), "screen.onnx", "screen")]


def head_logits(sessions: dict, hidden: np.ndarray, diffs: dict, check: str) -> np.ndarray:
    """The head's logits for hidden [batch, d]; checks the greedy screen on the same rows into diffs[check].

    The screen's bound is a guarantee, not an approximation: a row whose logit exceeds it fails the export."""
    from ..errors import ValidationError

    logits = sessions["head"].run(None, {"hidden": hidden})[0]  # [batch, V]
    if "screen" in sessions:
        count = min(16, logits.shape[1] - 1)
        ids, exact, rest = sessions["screen"].run(None, {"hidden": hidden, "candidates": np.array([count])})
        diffs[check] = compare(exact, np.take_along_axis(logits, ids, axis=1))
        others = logits.copy()
        np.put_along_axis(others, ids, -np.inf, axis=1)
        if not (others.max(axis=1) <= rest).all():
            raise ValidationError(f"the greedy screen's bound {rest.tolist()} is below a logit outside its "
                                  f"candidates ({others.max(axis=1).tolist()}); please report this.")
    return logits
