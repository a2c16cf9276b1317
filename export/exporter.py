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

from .errors import ExportError, ModelLoadError, OutputExistsError
from .families import family_for_model_type, parameter_count
from .graph import BUILT_MODES
from .screen import screen_fields
from .weights import CountingSource

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


def _resolve_source(source: str):
    """(config, weight source, source description, checkpoint folder or None) for `preset:NAME`, a local folder or
    a Hugging Face model id. Nothing here reads the weights: they are read one tensor at a time while writing."""
    from transformers import AutoConfig

    from .weights import CheckpointSource

    if source.startswith("preset:"):
        from .presets import preset_source

        name = source.split(":", 1)[1]
        config, weights = preset_source(name)
        return config, weights, {"model": source, "preset": name, "revision": None}, None
    if os.path.exists(source) and not os.path.isdir(source):
        raise ModelLoadError(f"{source} is a file; pass the checkpoint folder that holds config.json.")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelLoadError(f"{source} has no config.json; pass a Hugging Face checkpoint folder.")
    looks_local = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
    if looks_local and not os.path.isdir(source):
        raise ModelLoadError(f"{source} does not exist; pass a checkpoint folder, a model id or preset:NAME.")
    offline = not os.path.isdir(source) and not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except Exception as e:
        reason = ("the Hugging Face Hub is not reachable from here (offline, or HF_HUB_OFFLINE is set) and "
                  f"{source!r} is not in the local cache" if offline
                  else f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        raise ModelLoadError(
            f"could not read a config for {source!r} ({reason}). Pass a local checkpoint folder, a reachable "
            "model id, or preset:NAME for a random-weight preset."
        ) from e
    family_for_model_type(config.model_type)  # an unsupported model fails before any download
    folder = source if os.path.isdir(source) else _download(source)
    return config, CheckpointSource(folder), {"model": source, "preset": None,
                                              "revision": getattr(config, "_commit_hash", None)}, folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the Hub's host, so that an offline machine fails in seconds rather than after the
    Hub client's retries (about 30 s); HF_HUB_OFFLINE=1 skips the attempt."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(model_id: str) -> str:
    """The Hub snapshot of model_id (config, tokenizer and weights; safetensors when the repository has them)."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(model_id)
        weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) \
            else ["*.bin", "*.bin.index.json"]
        return snapshot_download(model_id, allow_patterns=["*.json", "*.model", *weights])
    except Exception as e:
        raise ModelLoadError(f"could not download the weights of {model_id!r} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}); download the checkpoint and pass its folder.") from e


def _check_weights(family, config, weights) -> None:
    """Every weight the graphs will read exists with the shape the config implies, before anything is written."""
    from .weights import CheckpointError

    expected = family.parameters(config)
    missing = [name for name in expected if name not in weights]
    wrong = [f"{name} is {list(weights.shape(name))}, the config implies {list(shape)}"
             for name, (shape, _) in expected.items() if name not in missing and tuple(weights.shape(name)) != shape]
    if missing or wrong:
        problems = [f"missing {name}" for name in missing[:5]] + wrong[:5]
        raise CheckpointError(f"the checkpoint does not match its config.json: {'; '.join(problems)}"
                              + (" ..." if len(missing) + len(wrong) > 10 else "")
                              + ". Pass a complete, unmodified checkpoint folder.")


def _save_tokenizer(source: str | None, folder: str, config) -> dict | None:
    """tokenizer.json (converted from spiece.model when that is all there is; a synthetic one over the whole
    vocabulary for a preset); None when there is none."""
    if source is None:  # a preset: text in and (random) text out, offline
        from .presets import SPECIAL_TOKENS, preset_tokenizer

        preset_tokenizer(config).save(os.path.join(folder, "tokenizer.json"))
        return {"file": "tokenizer.json", "vocab_size": config.vocab_size, "clean_up_tokenization_spaces": False,
                "special_token_ids": sorted(SPECIAL_TOKENS[config.model_type]),
                "synthetic": "generated for a random-weight preset (characters of the major scripts, letter "
                             "strings, byte fallback): not the model's real tokenizer"}
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


def _generation_config(config, folder: str | None):
    from transformers import GenerationConfig

    if folder and os.path.isfile(os.path.join(folder, "generation_config.json")):
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(config)


def _token_fields(config, generation) -> dict[str, Any]:
    eos = _eos_list(generation.eos_token_id) or _eos_list(config.eos_token_id)
    pad = generation.pad_token_id if generation.pad_token_id is not None else config.pad_token_id
    bos = generation.bos_token_id if generation.bos_token_id is not None else config.bos_token_id
    start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "decoder_start_token_id", None)
    return {
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "unk_token_id": getattr(config, "unk_token_id", None),
        "decoder_start_token_id": start if config.is_encoder_decoder else None,
        "vocab_size": int(config.vocab_size),  # the logits' width; wider than the tokenizer's vocabulary
    }


def _generation_defaults(generation) -> dict[str, Any]:
    return {key: getattr(generation, key) for key in GENERATION_KEYS if getattr(generation, key, None) is not None}


def file_entry(folder: str, filename: str) -> dict[str, Any]:
    """A graph file and the external-data files it points into (paths relative to folder), with sha256."""
    import onnx

    model = onnx.load(os.path.join(folder, filename), load_external_data=False)
    base = os.path.dirname(filename)
    data_files = sorted({os.path.join(base, entry.value) for tensor in model.graph.initializer
                         for entry in tensor.external_data if entry.key == "location"})
    def describe(name: str) -> dict[str, Any]:
        path = os.path.join(folder, name)
        os.chmod(path, 0o644)  # some writers (onnxruntime's quantizers) leave 0600: unreadable to a service's user
        return {"path": name, "bytes": os.path.getsize(path), "sha256": sha256_of(path)}

    return dict(describe(filename), data=[describe(name) for name in data_files])


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"xmtf_onnx": EXPORTER_VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _report(text: str) -> None:
    print(f"      {text}", file=sys.stderr, flush=True)


def _estimate_bytes(num_parameters: int, mode: str) -> int:
    return int(num_parameters * {"fp32": 4.3, "int8-dynamic": 1.1, "int8-weight": 1.2, "int4-weight": 0.7,
                                 "fp16": 2.2}[mode])


def export(source: str, output: str | os.PathLike, force: bool = False, tolerance: float = DEFAULT_TOLERANCE,
           validate: bool = True, progress: bool = True, quantize: list[str] | tuple[str, ...] = (),
           fp32: bool = True, validation: str = "auto", block_size: int | None = None,
           keep_fp32=None) -> str:
    """Export SOURCE (model id, checkpoint folder or preset:NAME) to the folder OUTPUT; returns OUTPUT.

    The weights are streamed: read tensor by tensor from the checkpoint (or generated, for a preset), written
    as they are produced, never held together. quantize: variants to add (int8, int8-dynamic, int8-weight and
    int4-weight are written straight from the checkpoint; fp16 is derived from the fp32 graphs). fp32=False
    leaves the fp32 variant out (a quantized-only folder: give at least one built mode). validation: auto
    (full up to 3B parameters when it fits in memory, reduced above), full, reduced or none (validate=False).
    The folder appears complete or not at all: everything is written to a temporary sibling folder and
    renamed at the end.
    """
    from .graph import WeightPlan
    from .quantize import check_options, default_block_size, default_keep_fp32, record_aliases, resolve_mode
    from .validation import choose_mode, quantized_checks, validate_full, validate_reduced

    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output) and not force:
        raise OutputExistsError(f"{output} exists; pass --force (force=True) to replace it.")
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ExportError(f"tolerance must be a positive number, not {tolerance!r}")
    patterns = None if keep_fp32 is None else check_options(block_size, keep_fp32, None)
    check_options(block_size, (), None)  # the block size, when no patterns were given
    modes = list(dict.fromkeys(resolve_mode(m) for m in quantize))
    if not fp32 and not any(m in BUILT_MODES for m in modes):
        raise ExportError("a folder without the fp32 variant needs a quantized one: add --quantize int4-weight "
                          f"(or one of {', '.join(BUILT_MODES)}).")
    if not fp32 and "fp16" in modes:
        raise ExportError("the fp16 variant is derived from the fp32 graphs; drop --no-fp32 or --quantize fp16.")
    validation = "none" if not validate else validation
    parent = os.path.dirname(output)
    built = (["fp32"] if fp32 else []) + [m for m in modes if m in BUILT_MODES]
    stages = ["read the config", *[f"write {v}" for v in built], "validate", *[m for m in modes if m == "fp16"],
              "write the manifest"]
    progress_bar = Progress(stages, progress)
    with progress_bar.stage(f"reading the config of {source}"):
        config, weights, source_fields, folder = _resolve_source(source)
        family = family_for_model_type(config.model_type)
        _check_weights(family, config, weights)
        num_parameters = parameter_count(family, config)
        mode = choose_mode(validation, num_parameters)
        generation = _generation_config(config, folder)
    created_parent = _make_parent(parent)
    need = sum(_estimate_bytes(num_parameters, v) for v in built + [m for m in modes if m == "fp16"])
    free = shutil.disk_usage(parent).free
    if need > free:
        raise ExportError(f"exporting {num_parameters / 1e9:.1f}B parameters as {', '.join(built)} needs about "
                          f"{need / 1e9:.0f} GB of disk, and {parent} has {free / 1e9:.0f} GB free; free some space, "
                          "or export a quantized variant alone (--quantize int4-weight --no-fp32).")
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    os.chmod(temporary, 0o755)
    total_bytes = 4 * num_parameters
    try:
        variants, fields, checks, io, fp32_roles = {}, {}, {}, {}, {}
        for variant in built:
            kept = default_keep_fp32(variant) if patterns is None and variant != "fp32" else patterns or ()
            if variant == "fp32":
                plan = WeightPlan()
            else:
                plan = WeightPlan(variant, block_size or default_block_size(variant, family.name), kept)
            with progress_bar.stage(f"writing the {variant} {family.name} graphs ({family.kind}), weights streamed"):
                reader = CountingSource(weights, total_bytes, _report if progress else None)
                written = _write_variant(family, config, reader, temporary, "" if variant == "fp32" else variant, plan)
            fields, io = written["fields"], io or written["io"]
            variants[variant] = {"quantization": None, "files": written["files"]}
            if variant == "fp32":
                fp32_roles = written["roles"]
            else:
                variants[variant]["quantization"] = _built_quantization(variant, plan, written["graphs"],
                                                                        written["roles"])
                checks[variant] = quantized_checks(written["store"])
        tokenizer = _save_tokenizer(folder, temporary, config)
        config.to_json_file(os.path.join(temporary, "config.json"))
        generation.to_json_file(os.path.join(temporary, "generation_config.json"))
        record: dict[str, Any] = {"mode": "none", "performed": False}
        if mode != "none":
            with progress_bar.stage(f"validating against PyTorch ({mode})"):
                if mode == "full":
                    scratch = temporary if fp32 else tempfile.mkdtemp(prefix=".validation-", dir=temporary)
                    roles = fp32_roles or _write_variant(family, config, weights, scratch, "", WeightPlan())["roles"]
                    record = validate_full(family, config, weights, scratch, roles, fields, tolerance)
                    if not fp32:
                        shutil.rmtree(scratch)
                        record["what"] = "fp32 graphs built by the same code in a scratch folder (not kept)"
                else:
                    scratch = tempfile.mkdtemp(prefix=".validation-", dir=temporary)
                    record = validate_reduced(family, config, weights, scratch, tolerance,
                                              _report if progress else (lambda text: None))
                    shutil.rmtree(scratch)
        if checks:
            record["quantized_weights"] = checks
        manifest = {
            "format_version": FORMAT_VERSION,
            "exporter": {"name": "xmtf-onnx", "version": EXPORTER_VERSION},
            "source": source_fields,
            "versions": _versions(),
            "family": family.name,
            "kind": family.kind,
            "model_type": config.model_type,
            "num_parameters": num_parameters,
            "default_variant": built[0],
            "variants": variants,
            "io": io,
            **fields,
            **({"greedy_screen": screen_fields()} if fp32 else {}),
            "tokens": _token_fields(config, generation),
            "tokenizer": tokenizer,
            "generation_defaults": _generation_defaults(generation),
            "validation": record,
        }
        for mode_name in modes:
            if mode_name == "fp16":
                from .quantize import add_variant

                with progress_bar.stage("deriving the fp16 variant from the fp32 graphs"):
                    add_variant(temporary, manifest, mode_name, block_size, patterns)  # None: the defaults
        with progress_bar.stage("writing the manifest"):
            record_aliases(manifest)
            for name, entry in variants.items():
                roles_built = set(entry["files"]) - set(OPTIONAL_ROLES)
                if roles_built != set(ROLES[family.kind]):
                    raise ExportError(f"family {family.name} built {sorted(roles_built)} for {name}, "
                                      f"not {ROLES[family.kind]}")
            write_manifest(temporary, manifest)
        _replace(temporary, output, force)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if created_parent:
            shutil.rmtree(created_parent, ignore_errors=True)
        raise
    return output


def _write_variant(family, config, weights, folder: str, subfolder: str, plan) -> dict[str, Any]:
    """Build and write one variant's graphs under folder/subfolder: its files (manifest entries), the family's
    manifest fields, roles, IO names, and the graphs and store (what was quantized, the read-back checks)."""
    from .families.common import Store
    from .graph import SHARED_SUFFIX, save_forms, shared_buffer_fields

    target = os.path.join(folder, subfolder)
    os.makedirs(target, exist_ok=True)
    store = Store(target)
    graphs, fields = family.build(config, weights, store, plan)
    written = save_forms(target, graphs)
    for role in [role for _, _, role in graphs if role + SHARED_SUFFIX in written]:
        fields["cache"]["shared_buffer"] = shared_buffer_fields(role)
    graph_of = {role: graph for graph, _, role in graphs}
    roles = {role: entry["filename"] for role, entry in written.items()}
    return {"files": {role: file_entry(folder, os.path.join(subfolder, name)) for role, name in roles.items()},
            "fields": fields, "roles": roles, "store": store,
            "graphs": [graph_of[role.removesuffix(SHARED_SUFFIX)] for role in roles],
            "io": {role: {key: entry[key] for key in ("inputs", "outputs")} for role, entry in written.items()}}


def _built_quantization(mode: str, plan, graphs: list, roles: dict[str, str]) -> dict:
    """The manifest's quantization record of a variant written by the builder (as add_variant's, plus how)."""
    import onnxruntime

    quantized = sorted({name for graph in graphs for name in graph.quantized})
    kept = {role: sorted(set(graph.kept_fp32)) for role, graph in zip(roles, graphs) if role not in OPTIONAL_ROLES}
    common = {"mode": mode, "written_from": "the checkpoint, tensor by tensor (no fp32 graphs)",
              "onnxruntime": onnxruntime.__version__,
              "kept_fp32": {"patterns": list(plan.keep_fp32), "weights": kept}, "quantized_weights": len(quantized)}
    if mode == "int8-dynamic":
        tied = any(node.op_type == "QGemm" for graph in graphs for node in graph.nodes)
        head = {"head": "DynamicQuantizeLinear + com.microsoft.QGemm (transB) over the embedding's int8 rows"} if tied \
            else {}
        embedding = ("int8 rows, one scale per row, shared with the head" if tied
                     else f"com.microsoft.GatherBlockQuantized, 8-bit blocks of {plan.block_size}")
        return {"method": "dynamic", "weight_type": "int8", "per_channel": True, "ops": ["MatMul"],
                "op": "com.microsoft.DynamicQuantizeMatMul", "activations": "uint8, quantized per call",
                "providers": ["cpu"], **head, "embedding": embedding, **common}
    return {"method": "weight-only", "weight_type": f"int{plan.bits}", "block_size": plan.block_size, "symmetric": True,
            "ops": ["MatMul"], "op": "com.microsoft.MatMulNBits", "accuracy_level": 4, "providers": ["cpu", "cuda"],
            "embedding": f"com.microsoft.GatherBlockQuantized over the same {plan.bits}-bit blocks "
                         "(one copy when the head is tied to the embedding)", **common}


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
