"""Restricted output vocabulary: a variant whose head (and greedy screen) keep only the rows a deployment needs.

At B=1 the output projection is most of the bytes a decode step reads (mt0-small int8: about 128 of ~160 MB),
so a head over 32k of the 250k rows is most of the way to a 4x faster step on a memory-bound CPU. The variant
computes what a model whose output projection has only the kept rows computes: greedy equals transformers with
every other token suppressed, and beam search equals transformers with the log-probabilities renormalised over
the kept set (see the README). Prompts may still use any token: the input embedding is untouched.

The kept rows are copied from the base variant's head as stored (fp32 rows, per-channel int8 columns, or
MatMulNBits blocks), so the restricted head is bit for bit the base head's rows; an fp32 head gets its greedy
screen rebuilt over the kept rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from xmtf_onnx.runtime.manifest import ROLES, SHARED_DECODER, read_manifest, sha256_of, write_manifest

from .errors import ExportError, OutputExistsError

HEAD_OPS = ("Gemm", "MatMulNBits", "QGemm", "DynamicQuantizeMatMul", "MatMulInteger", "MatMul")  # the first found names it
VOCABULARY_FILE = "vocabulary.ids"  # int64 little-endian token ids, ascending: logit column c is token ids[c]


class RestrictError(ExportError, ValueError):
    """The restricted variant could not be made from what was given; nothing was written."""


def read_token_ids(path: str, vocab_size: int) -> np.ndarray:
    """Token ids separated by whitespace (or commas), each in [0, vocab_size)."""
    try:
        with open(path, encoding="utf-8") as handle:
            fields = handle.read().replace(",", " ").split()
        ids = np.array([int(field) for field in fields], dtype=np.int64)
    except (OSError, ValueError) as e:
        raise RestrictError(f"{path} must hold token ids separated by whitespace ({e})") from e
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.size:
        raise RestrictError(f"{path} holds ids outside [0, {vocab_size}): {outside[:5].tolist()}")
    return ids


def corpus_ids(manifest, paths: Sequence[str], held_out_every: int) -> tuple[np.ndarray, np.ndarray]:
    """The export's tokenizer over the non-empty lines of the text files -> (token ids of the lines kept for the
    vocabulary, token ids of the held-out lines: every held_out_every-th line, 0 for none)."""
    from tokenizers import Tokenizer

    entry = manifest.data.get("tokenizer")
    if not entry:
        raise RestrictError(f"{manifest.folder} has no tokenizer.json, so --tokens-from cannot tokenize text; "
                            "give the token ids with --token-ids FILE instead.")
    tokenizer = Tokenizer.from_file(manifest.path(entry["file"]))
    lines = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                lines += [line.strip() for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise RestrictError(f"cannot read {path} as UTF-8 text ({e})") from e
    if not lines:
        raise RestrictError(f"{', '.join(paths)} hold no text; give files with the text the deployment will see.")
    held = [i % held_out_every == held_out_every - 1 for i in range(len(lines))] if held_out_every else \
        [False] * len(lines)
    encodings = tokenizer.encode_batch(lines, add_special_tokens=False)
    pick = lambda flag: np.array([t for e, h in zip(encodings, held) if h == flag for t in e.ids], np.int64)  # noqa: E731
    return pick(False), pick(True)


def always_kept(manifest) -> set[int]:
    """Every special token of the tokenizer, every eos id, and the bos, unk, decoder start and pad ids."""
    tokens = manifest.tokens
    kept = set((manifest.data.get("tokenizer") or {}).get("special_token_ids", []))
    kept.update(int(t) for t in tokens.get("eos_token_id") or [])
    for key in ("bos_token_id", "unk_token_id", "decoder_start_token_id", "pad_token_id"):
        if tokens.get(key) is not None:
            kept.add(int(tokens[key]))
    return kept


def _tensor_array(tensor: onnx.TensorProto, folder: str) -> np.ndarray:
    """A graph initializer stored as external data, memory-mapped (the head's data is not loaded)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    if tensor.data_location != onnx.TensorProto.EXTERNAL or "location" not in info:
        return onnx.numpy_helper.to_array(tensor)
    return np.memmap(os.path.join(folder, info["location"]), dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type),
                     mode="r", offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))


def _head_node(model: onnx.ModelProto, path: str) -> onnx.NodeProto:
    for op_type in HEAD_OPS:
        nodes = [node for node in model.graph.node if node.op_type == op_type]
        if nodes:
            return nodes[0]
    raise RestrictError(f"{path} has no output projection this version can restrict (one of {', '.join(HEAD_OPS)}); "
                        "export the model again.")


def join_head_blocks(model: onnx.ModelProto, folder: str) -> None:
    """A head written in row blocks (one node per block, Gemm, QGemm or MatMulNBits, joined by a Concat:
    families/common.head_row_blocks) made one node over all rows, in place: the blocks' tensors are read, joined
    along their rows and held in the graph (raw data) until the caller writes them. A head of one node is left as
    it is."""
    concat = next((n for n in model.graph.node if n.op_type == "Concat" and list(n.output) == ["logits"]), None)
    producers = {n.output[0]: n for n in model.graph.node}
    parts = [producers.get(name) for name in concat.input] if concat is not None else []
    if not parts or any(part is None or part.op_type not in ("Gemm", "QGemm", "MatMulNBits") for part in parts):
        return
    tensors = {t.name: t for t in model.graph.initializer}
    first = parts[0]
    for position in range(1, len(first.input)):
        if first.input[position] in tensors:
            joined = np.concatenate([_tensor_array(tensors[part.input[position]], folder) for part in parts], axis=0)
            tensor = tensors[first.input[position]]
            tensor.dims[:] = joined.shape
            tensor.ClearField("external_data")
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = joined.tobytes()
    for attribute in first.attribute:
        if attribute.name == "N":
            attribute.i = sum(tensors[part.input[1]].dims[0] for part in parts)
    dropped = {name for part in parts[1:] for name in part.input[1:]}
    first.output[0] = concat.output[0]
    nodes = [n for n in model.graph.node if n is first or (n not in parts and n is not concat)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _restricted_quantized_head(head_path: str, kept: np.ndarray, target: str, vocab: int) -> None:
    """The base's quantized head with only the kept output rows: the stored bytes of those rows, copied.
    MatMulNBits keeps N rows of blocks (and their scales); any other head (QGemm: int8 rows [V, d] with per-row
    scales and zero points; DynamicQuantizeMatMul, MatMulInteger: int8 columns [d, V] with per-column scales) is cut
    along the axis of its initializers that has the logits' width."""
    from .graph import WeightFile

    model = onnx.load(head_path, load_external_data=False)
    source_folder = os.path.dirname(head_path)
    join_head_blocks(model, source_folder)
    node = _head_node(model, head_path)
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    selected: dict[str, np.ndarray] = {}
    if node.op_type == "MatMulNBits":  # B [N, blocks, blob], scales [N * blocks] or [N, blocks], zero points by row
        for attribute in node.attribute:
            if attribute.name == "N":
                attribute.i = len(kept)
        inputs = list(node.input)
        selected[inputs[1]] = _tensor_array(tensors[inputs[1]], source_folder)[kept]
        for name in inputs[2:4]:
            if name in tensors:
                array = _tensor_array(tensors[name], source_folder)
                selected[name] = array.reshape(vocab, -1)[kept].reshape((-1,) if array.ndim == 1 else (len(kept), -1))
    else:
        for name, tensor in tensors.items():
            axes = [axis for axis, size in enumerate(tensor.dims) if size == vocab]
            if len(axes) == 1:
                selected[name] = np.take(_tensor_array(tensor, source_folder), kept, axis=axes[0])
    if not selected:
        raise RestrictError(f"{head_path} holds no weight of the logits' width {vocab}; export the model again.")
    weights = WeightFile("head.onnx.data").bind(target)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.name not in selected:
            continue
        array = selected.get(tensor.name)
        array = _tensor_array(tensor, source_folder) if array is None else array
        weights.add(tensor.name, np.ascontiguousarray(array))
        tensor.CopyFrom(weights.tensor(tensor.name, tensor.name))  # now pointing into the variant's own file
    for output in model.graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[-1].dim_value = len(kept)
    path = os.path.join(target, "head.onnx")
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    onnx.checker.check_model(path)


def _restricted_fp32_head(head_path: str, kept: np.ndarray, target: str) -> list[str]:
    """The fp32 head over the kept rows, and its greedy screen rebuilt over them (the builder's own graphs)."""
    from .families.common import HEAD_WEIGHT, output_graphs
    from .graph import WeightFile, WeightPlan, save_graph
    from .weights import ArraySource

    model = onnx.load(head_path, load_external_data=False)
    join_head_blocks(model, os.path.dirname(head_path))
    node = _head_node(model, head_path)
    table = {tensor.name: tensor for tensor in model.graph.initializer}[node.input[1]]
    rows = np.asarray(_tensor_array(table, os.path.dirname(head_path))[kept], dtype=np.float32)  # [kept, d]
    weights = WeightFile("head.onnx.data").bind(target)
    graphs = output_graphs(rows.shape[1], ArraySource({HEAD_WEIGHT: rows}), HEAD_WEIGHT, weights, HEAD_WEIGHT,
                           WeightPlan())
    for graph, filename, _ in graphs:
        save_graph(target, graph, filename)
    return [role for _, _, role in graphs]


def restrict(folder: str, name: str, *, texts: Sequence[str] = (), token_ids: str | None = None, min_count: int = 1,
             held_out_every: int = 10, variant: str | None = None, force: bool = False) -> dict[str, Any]:
    """Add variant NAME to the exported FOLDER: the base variant (default: the folder's default) with its head and
    greedy screen restricted to the tokens of `texts` (seen at least min_count times, every held_out_every-th line
    held out to measure coverage; 0: none) or of the `token_ids` file, plus every special token. Returns the
    manifest's record of it (rows kept, coverage)."""
    from .exporter import file_entry
    from .quantize import variant_folder

    manifest = read_manifest(folder)
    if not name or os.sep in name or name.startswith(".") or name in ("fp32",):
        raise RestrictError(f"{name!r} cannot name a variant; use a plain name such as int8-en")
    if name in manifest.variants and not force:
        raise OutputExistsError(f"{folder} already has variant {name}; pass --force to rebuild it.")
    if bool(texts) == bool(token_ids):
        raise RestrictError("give the text the deployment will see (--tokens-from FILE ...) or the token ids to "
                            "keep (--token-ids FILE), one of the two.")
    if not isinstance(min_count, int) or min_count < 1:
        raise RestrictError(f"min_count must be an integer >= 1, not {min_count!r}")
    base_name = manifest.variant_name(variant or manifest.default_variant)
    base = manifest.variant(base_name)
    if base.get("restricted"):
        raise RestrictError(f"{base_name} is itself restricted; restrict the variant it came from "
                            f"({base['restricted']['base']}).")
    vocab_size = int(manifest.tokens["vocab_size"])
    coverage: dict[str, Any] = {}
    if token_ids:
        chosen = read_token_ids(token_ids, vocab_size)
        source = {"token_ids": os.path.abspath(token_ids)}
    else:
        seen, held = corpus_ids(manifest, texts, held_out_every)
        counts = np.bincount(seen, minlength=vocab_size)
        chosen = np.flatnonzero(counts >= min_count)
        source = {"tokens_from": [os.path.abspath(p) for p in texts], "min_count": min_count,
                  "held_out": f"every {held_out_every}th line" if held_out_every else "none"}
    kept = np.union1d(chosen, np.array(sorted(always_kept(manifest)), np.int64)).astype(np.int64)
    kept = kept[(kept >= 0) & (kept < vocab_size)]
    if kept.size < 2:
        raise RestrictError("fewer than two tokens would be kept; give more text or ids.")
    if not token_ids:
        in_kept = np.zeros(vocab_size, bool)
        in_kept[kept] = True
        coverage = {"corpus_tokens": int(seen.size), "corpus_share": float(in_kept[seen].mean()) if seen.size else None,
                    "held_out_tokens": int(held.size),
                    "held_out_share": float(in_kept[held].mean()) if held.size else None}
    head_path = manifest.path(base["files"]["head"]["path"])
    head_op = _head_node(onnx.load(head_path, load_external_data=False), head_path).op_type
    with variant_folder(folder, name) as partial:
        if head_op == "Gemm":
            roles = _restricted_fp32_head(head_path, kept, partial)
        else:
            _restricted_quantized_head(head_path, kept, partial, vocab_size)
            roles = ["head"]
        kept.astype("<i8").tofile(os.path.join(partial, VOCABULARY_FILE))
    files = {role: base["files"][role] for role in (*ROLES[manifest.kind], SHARED_DECODER)
             if role != "head" and role in base["files"]}  # the base's decoders, shared-buffer form included
    files.update({role: file_entry(folder, os.path.join(name, f"{role}.onnx")) for role in roles})
    ids_path = os.path.join(name, VOCABULARY_FILE)
    os.chmod(os.path.join(folder, ids_path), 0o644)
    files["vocabulary"] = {"path": ids_path, "bytes": os.path.getsize(os.path.join(folder, ids_path)),
                           "sha256": sha256_of(os.path.join(folder, ids_path)), "data": []}
    record = {"base": base_name, "rows": int(kept.size), "vocab_size": vocab_size,
              "kept_share": kept.size / vocab_size, "head": head_op, "source": source, "coverage": coverage,
              "scores": "log-probabilities over the kept tokens (renormalised), as a model whose projection has "
                        "only these rows"}
    manifest.data["variants"][name] = {"quantization": base.get("quantization"), "files": files, "restricted": record}
    write_manifest(folder, manifest.data)
    return record
