"""export(MODEL, OUTPUT): a model id, a checkpoint folder or `preset:NAME` -> a self-describing ONNX folder."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from xmtf_onnx.runtime.manifest import FORMAT_VERSION, OPTIONAL_ROLES, ROLES, sha256_of, write_manifest
from xmtf_onnx.runtime.session import make_session

from .errors import ExportError, ModelLoadError, OutputExistsError, ValidationError
from .families import family_for_model_type
from .graph import save_graphs
from .screen import screen_fields

EXPORTER_VERSION = "0.1.0"
DEFAULT_TOLERANCE = 1e-3
GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping",
                   "no_repeat_ngram_size", "repetition_penalty", "do_sample", "temperature", "top_k", "top_p",
                   "num_return_sequences")


class Progress:
    """Stages on stderr with elapsed time: export takes minutes on large models and must not be silent."""

    def __init__(self, stages: list[str], enabled: bool = True):
        self.total, self.done, self.enabled, self.start = len(stages), 0, enabled, time.perf_counter()

    @contextmanager
    def stage(self, text: str):
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total}] {text} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        yield
        if self.enabled:
            print(f"      done in {time.perf_counter() - began:.1f}s", file=sys.stderr, flush=True)


def _load_model(source: str):
    """(model, source description) from `preset:NAME`, a local folder or a Hugging Face model id."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if source.startswith("preset:"):
        from .presets import preset_model

        return preset_model(source.split(":", 1)[1]), {"model": source, "preset": source.split(":", 1)[1]}
    if os.path.exists(source) and not os.path.isdir(source):
        raise ModelLoadError(f"{source} is a file; pass the checkpoint folder that holds config.json.")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelLoadError(f"{source} has no config.json; pass a Hugging Face checkpoint folder.")
    looks_local = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
    if looks_local and not os.path.isdir(source):
        raise ModelLoadError(f"{source} does not exist; pass a checkpoint folder, a model id or preset:NAME.")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise ModelLoadError(
            f"could not read a config for {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "Pass a local checkpoint folder, a reachable model id, or preset:NAME for a random-weight preset."
        ) from e
    family = family_for_model_type(config.model_type)
    auto = AutoModelForSeq2SeqLM if family.kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(source, dtype=torch.float32).eval()
    except Exception as e:
        raise ModelLoadError(f"could not load the weights of {source!r}: {type(e).__name__}: {e}") from e
    return model, {"model": source, "revision": getattr(config, "_commit_hash", None), "preset": None}


def _save_tokenizer(source: str, folder: str) -> dict | None:
    """tokenizer.json (converted from spiece.model when that is all there is); None when there is none."""
    if source.startswith("preset:"):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except Exception as e:  # no tokenizer files at all: the export stays usable with token ids
        print(f"warning: no tokenizer exported ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
        return None
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("the tokenizer could not be converted to tokenizer.json; "
                          "install the export extra (sentencepiece, protobuf).")
    tokenizer.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return {
        "file": "tokenizer.json",
        "vocab_size": len(tokenizer),
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
        "special_token_ids": sorted(set(tokenizer.all_special_ids)),
    }


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _token_fields(model) -> dict[str, Any]:
    config, generation = model.config, model.generation_config
    eos = _eos_list(generation.eos_token_id) or _eos_list(config.eos_token_id)
    pad = generation.pad_token_id if generation.pad_token_id is not None else config.pad_token_id
    bos = generation.bos_token_id if generation.bos_token_id is not None else config.bos_token_id
    start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "decoder_start_token_id", None)
    return {
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "unk_token_id": getattr(config, "unk_token_id", None),
        "decoder_start_token_id": start if model.config.is_encoder_decoder else None,
        "vocab_size": int(config.vocab_size),  # the logits' width; wider than the tokenizer's vocabulary
    }


def _generation_defaults(model) -> dict[str, Any]:
    generation = model.generation_config
    return {key: getattr(generation, key) for key in GENERATION_KEYS if getattr(generation, key, None) is not None}


def file_entry(folder: str, filename: str) -> dict[str, Any]:
    """A graph file and the external-data files it points into (paths relative to folder), with sha256."""
    import onnx

    model = onnx.load(os.path.join(folder, filename), load_external_data=False)
    base = os.path.dirname(filename)
    data_files = sorted({os.path.join(base, entry.value) for tensor in model.graph.initializer
                         for entry in tensor.external_data if entry.key == "location"})
    describe = lambda name: {"path": name, "bytes": os.path.getsize(os.path.join(folder, name)),  # noqa: E731
                             "sha256": sha256_of(os.path.join(folder, name))}
    return dict(describe(filename), data=[describe(name) for name in data_files])


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"xmtf_onnx": EXPORTER_VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _check_tolerance(diffs: dict[str, dict], tolerance: float) -> None:
    failures = [f"{name}: {d['max_abs_diff']:.3g} (reference scale {d['max_abs_reference']:.3g})"
                + (f" {d['error']}" if "error" in d else "")
                for name, d in diffs.items()
                if not d["max_abs_diff"] <= tolerance * max(1.0, d["max_abs_reference"])]
    if failures:
        raise ValidationError(
            f"the ONNX graphs disagree with PyTorch beyond tolerance {tolerance} (relative to max(1, |ref|)): "
            + "; ".join(failures[:8]) + (" ..." if len(failures) > 8 else "")
            + ". Nothing was written. If the model is known to be numerically sensitive, raise --tolerance."
        )


def export(source: str, output: str | os.PathLike, force: bool = False, tolerance: float = DEFAULT_TOLERANCE,
           validate: bool = True, progress: bool = True, quantize: list[str] | tuple[str, ...] = ()) -> str:
    """Export SOURCE (model id, checkpoint folder or preset:NAME) to the folder OUTPUT; returns OUTPUT.

    The folder appears complete or not at all: everything is written to a temporary sibling folder
    and renamed at the end.
    """
    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output) and not force:
        raise OutputExistsError(f"{output} exists; pass --force (force=True) to replace it.")
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ExportError(f"tolerance must be a positive number, not {tolerance!r}")
    parent = os.path.dirname(output)
    stages = ["load the model", "build the ONNX graphs", "write tokenizer and configs"]
    stages += ["validate against PyTorch"] if validate else []
    stages += [f"quantize ({mode})" for mode in quantize] + ["write the manifest"]
    progress_bar = Progress(stages, progress)
    with progress_bar.stage(f"loading {source}"):
        model, source_fields = _load_model(source)
        family = family_for_model_type(model.config.model_type)
    created_parent = _make_parent(parent)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    os.chmod(temporary, 0o755)
    try:
        with progress_bar.stage(f"building the {family.name} graphs ({family.kind})"):
            graphs, fields = family.build(model)
            save_graphs(temporary, [(graph, filename) for graph, filename, _ in graphs])
            roles = {role: filename for _, filename, role in graphs}
        with progress_bar.stage("writing tokenizer.json, config.json, generation_config.json"):
            tokenizer = _save_tokenizer(source, temporary)
            model.config.to_json_file(os.path.join(temporary, "config.json"))
            model.generation_config.to_json_file(os.path.join(temporary, "generation_config.json"))
        sessions = {role: make_session(os.path.join(temporary, filename), "cpu") for role, filename in roles.items()}
        io = {role: {"inputs": [i.name for i in s.get_inputs()], "outputs": [o.name for o in s.get_outputs()]}
              for role, s in sessions.items()}
        validation: dict[str, Any] = {"performed": False}
        if validate:
            with progress_bar.stage("validating the graphs against PyTorch"):
                diffs = family.validate(model, sessions, fields, np.random.default_rng(0))
                _check_tolerance(diffs, tolerance)
                validation = {"performed": True, "tolerance": tolerance,
                              "rule": "max_abs_diff <= tolerance * max(1, max_abs_reference)", "outputs": diffs}
        del sessions
        manifest = {
            "format_version": FORMAT_VERSION,
            "exporter": {"name": "xmtf-onnx", "version": EXPORTER_VERSION},
            "source": source_fields,
            "versions": _versions(),
            "family": family.name,
            "kind": family.kind,
            "model_type": model.config.model_type,
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "variants": {"fp32": {"quantization": None,
                                  "files": {role: file_entry(temporary, name) for role, name in roles.items()}}},
            "io": io,
            **fields,
            **({"greedy_screen": screen_fields()} if "screen" in roles else {}),
            "tokens": _token_fields(model),
            "tokenizer": tokenizer,
            "generation_defaults": _generation_defaults(model),
            "validation": validation,
        }
        for mode in quantize:
            from .quantize import add_variant

            with progress_bar.stage(f"quantizing ({mode})"):
                add_variant(temporary, manifest, mode)
        with progress_bar.stage("writing the manifest"):
            if set(roles) - set(OPTIONAL_ROLES) != set(ROLES[family.kind]):
                raise ExportError(f"family {family.name} built {sorted(roles)}, not {ROLES[family.kind]}")
            write_manifest(temporary, manifest)
        _replace(temporary, output, force)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if created_parent:
            shutil.rmtree(created_parent, ignore_errors=True)
        raise
    return output


def _make_parent(parent: str) -> str | None:
    """Create OUTPUT's missing parent folders; return the topmost one created (removed again on failure)."""
    topmost = None
    path = parent
    while not os.path.exists(path):
        topmost, path = path, os.path.dirname(path)
    if topmost is not None:
        os.makedirs(parent)
    return topmost


def _replace(temporary: str, output: str, force: bool) -> None:
    """Move the finished folder into place; an old OUTPUT is removed only once the new one is complete."""
    if os.path.exists(output):
        if not force:
            raise OutputExistsError(f"{output} appeared while exporting; pass --force to replace it.")
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
        os.rename(output, os.path.join(trash, "old"))
        os.rename(temporary, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(temporary, output)


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
