"""Validation against PyTorch, full or in bounded memory, and what the manifest records of it.

full     the exported fp32 graphs against the whole transformers model (first step and with past,
         padded batch): needs the model in torch plus the graphs, about 2.2x the fp32 weights.
reduced  for models that do not fit (by default from 3B parameters): truncated-depth probes — the
         first and last layers of the real weights at full width, with the first rows of the
         vocabulary — exported by the same code and compared with transformers end to end. The
         quantized weights are read back and compared with the source per tensor in both modes
         (graph.check_quantized). The manifest says exactly which layers were compared.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from .errors import ExportError, ValidationError
from .families import parameter_count

MODES = ("auto", "full", "reduced", "none")
FULL_UP_TO_PARAMETERS = 3_000_000_000
PROBE_VOCAB_ROWS = 4096
PROBE_BUDGET_BYTES = 1 << 30  # fp32 bytes of a probe with two layers per stack; above it, one layer per probe


def available_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def choose_mode(requested: str, num_parameters: int) -> str:
    """auto -> full when the model is under 3B parameters and the comparison fits in memory, reduced otherwise."""
    if requested not in MODES:
        raise ExportError(f"validation must be one of {', '.join(MODES)}, not {requested!r}")
    if requested != "auto":
        return requested
    fits = 2.2 * 4 * num_parameters + (1 << 30) <= 0.85 * available_memory()
    return "full" if num_parameters < FULL_UP_TO_PARAMETERS and fits else "reduced"


def torch_model(family, config, weights):
    """The transformers model of `config` with the source's weights (no random initialisation, no second copy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if family.kind == "seq2seq" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied again below
            parameter.copy_(torch.from_numpy(weights.get(name)))
        for name, _ in model.named_buffers():
            raise ExportError(f"{config.model_type} has buffer {name}, which this validation does not fill")
    model.tie_weights()
    return model.eval()


def validation_sessions(folder: str, roles: dict[str, str]) -> dict:
    """CPU sessions without prepacking: validation reads each weight once, a heap copy would only cost memory."""
    import onnxruntime as ort

    from xmtf_onnx.runtime.session import make_session

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    return {role: make_session(os.path.join(folder, filename), "cpu", options=options)
            for role, filename in roles.items()}


def check_tolerance(diffs: dict[str, dict], tolerance: float, what: str = "") -> None:
    failures = [f"{name}: {d['max_abs_diff']:.3g} (reference scale {d['max_abs_reference']:.3g})"
                + (f" {d['error']}" if "error" in d else "")
                for name, d in diffs.items()
                if not d["max_abs_diff"] <= tolerance * max(1.0, d["max_abs_reference"])]
    if failures:
        raise ValidationError(
            f"the ONNX graphs{what} disagree with PyTorch beyond tolerance {tolerance} (relative to max(1, |ref|)): "
            + "; ".join(failures[:8]) + (" ..." if len(failures) > 8 else "")
            + ". Nothing was written. If the model is known to be numerically sensitive, raise --tolerance."
        )


def validate_full(family, config, weights, folder: str, roles: dict[str, str], fields: dict,
                  tolerance: float) -> dict[str, Any]:
    sessions = validation_sessions(folder, roles)
    diffs = family.validate(config, lambda: torch_model(family, config, weights), sessions, fields,
                            np.random.default_rng(0))
    check_tolerance(diffs, tolerance)
    return {"mode": "full", "performed": True, "tolerance": tolerance,
            "rule": "max_abs_diff <= tolerance * max(1, max_abs_reference)", "outputs": diffs}


def _probe_layers(family, config) -> list:
    """Layer selections: first and last together when that fits the budget, else each alone."""
    def size(select) -> int:
        small = family.truncate(config, select, PROBE_VOCAB_ROWS)[0]
        return 4 * parameter_count(family, small)

    first_and_last = lambda count: sorted({0, count - 1})  # noqa: E731
    if size(first_and_last) <= PROBE_BUDGET_BYTES:
        return [first_and_last]
    return [lambda count: [0], lambda count: [count - 1]]


def validate_reduced(family, config, weights, scratch: str, tolerance: float, log) -> dict[str, Any]:
    """Truncated-depth probes of the real weights, exported by the same builder and compared end to end."""
    from .families.common import Store
    from .graph import WeightPlan, save_forms
    from .weights import TruncatedSource

    probes = []
    for index, select in enumerate(_probe_layers(family, config)):
        small, rename, vocab_names, layers = family.truncate(config, select, PROBE_VOCAB_ROWS)
        view = TruncatedSource(weights, rename, vocab_names, PROBE_VOCAB_ROWS)
        folder = os.path.join(scratch, f"probe-{index}")
        os.makedirs(folder)
        log(f"probe {index}: layers {layers}, first {small.vocab_size} vocabulary rows, full width")
        graphs, fields = family.build(small, view, Store(folder), WeightPlan())
        roles = {role: entry["filename"] for role, entry in save_forms(folder, graphs).items()}
        sessions = validation_sessions(folder, roles)
        diffs = family.validate(small, lambda: torch_model(family, small, view), sessions, fields,
                                np.random.default_rng(index))
        del sessions
        shutil.rmtree(folder, ignore_errors=True)
        check_tolerance(diffs, tolerance, f" of probe {layers}")
        probes.append({"layers": layers, "vocab_rows": small.vocab_size, "outputs": diffs})
    return {"mode": "reduced", "performed": True, "tolerance": tolerance,
            "rule": "max_abs_diff <= tolerance * max(1, max_abs_reference)",
            "what": "truncated-depth models of the real weights (the layers listed, full width, the first vocabulary "
                    "rows) exported by the same builder and compared with transformers end to end (first step and "
                    "with past, padded batch); every quantized weight read back from disk and compared with its "
                    "source (quantized_weights). The full model was not compared.",
            "probes": probes}


def quantized_checks(store) -> dict[str, Any]:
    """What check_quantized recorded while writing: the worst read-back error in quantization steps per tensor."""
    checks = {name: round(ratio, 4) for weight_file in store.files.values() for name, ratio in weight_file.checks.items()}
    if not checks:
        return {}
    worst = max(checks, key=checks.get)
    if not checks[worst] <= 1.0 + 1e-3:
        raise ValidationError(f"the quantized weight {worst} read back from disk differs from its source by "
                              f"{checks[worst]:.3g} quantization steps (at most 1 is rounding); please report this.")
    return {"tensors": len(checks), "bound_in_steps": 1.0, "worst": {"weight": worst, "steps": checks[worst]},
            "per_tensor": checks}
