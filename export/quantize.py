"""Quantized variants of an export, each in its own subfolder and recorded in the manifest.

Modes:
  int8-dynamic  MatMulInteger with per-channel int8 weights, activations quantized per call (CPU only)
  int8-weight   MatMulNBits, 8-bit weights in blocks (CPU and CUDA)
  int4-weight   MatMulNBits, 4-bit weights in blocks (CPU and CUDA)
  fp16          MatMuls in fp16, elementwise ops and mT5's FFN output projection in fp32 (for CUDA)
  int8          the fastest int8 mode on CPU (measured with the benchmark suite): int8-dynamic
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from xmtf_onnx.runtime.manifest import OPTIONAL_ROLES, read_manifest, write_manifest

from .errors import ExportError, OutputExistsError
from .exporter import file_entry
from .graph import (ALIGNMENT, MS_DOMAIN, PAGE, PAGE_ALIGNED_FROM, WeightFile, WeightPlan, block_table,
                    int8_rows_lookup, int8_rows_table, save_graph)
from .weights import ArraySource

MODES = ("int8-dynamic", "int8-weight", "int4-weight", "fp16")
# fp16: MatMul weights and activations in fp16 (tensor cores on CUDA); everything elementwise -- the residual
# stream, the norms, the T5 FFN product -- and the keep-fp32 MatMuls stay fp32, so mT5's FFN outputs, which
# overflow fp16, never meet it. Inputs, outputs and the KV cache stay fp32.
FP32_OPS = ["Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "ReduceMean", "LayerNormalization", "SimplifiedLayerNormalization",
            "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "CumSum", "Range", "Where", "Expand",
            "FastGelu", "Gelu", "Relu", "Tanh", "Erf", "Gather", "MultiHeadAttention"]
ALIASES = {"int8": "int8-dynamic"}
# MatMulNBits' kernels do a fixed amount of work per block: at the decode step's one row, blocks of 128 read the
# weights 25-45% faster than blocks of 32 (onnxruntime 1.32, AMD EPYC; bloomz-560m int4 1x1 51 -> 64 tok/s, int8-weight
# 1x1 beats int8-dynamic), and the fp32 scales shrink from 1/8 to 1/32 of the 4-bit bytes. A family may keep finer
# blocks for a mode (Family.block_sizes).
DEFAULT_BLOCK_SIZE = 128
# MatMuls whose weight name matches one of these (fnmatch) stay fp32. The output projection is named "lm_head"
# in every graph (a tied one too, once rewritten to MatMul). Default for int8-dynamic and fp16: mT5's FFN output
# projection, whose activations are the large ones (on mt0-small int8-dynamic it halves the KL to fp32 at no
# measurable speed cost; in fp16 it overflows). The weight-only modes quantize it too: there it is a sixth of an
# mT0's weights (2 GB fp32 in mt0-xl, 8 GB in mt0-xxl), which a 4-bit export exists to avoid.
DEFAULT_KEEP_FP32: tuple[str, ...] = ("*DenseReluDense.wo",)


def default_keep_fp32(mode: str) -> tuple[str, ...]:
    return DEFAULT_KEEP_FP32 if resolve_mode(mode) in ("int8-dynamic", "fp16") else ()


def default_block_size(mode: str, family: str) -> int:
    """The block size a weight-only mode gets when none is given, for family (its registered name)."""
    from .families import FAMILIES

    known = FAMILIES.get(family)
    return known.block_sizes.get(resolve_mode(mode), DEFAULT_BLOCK_SIZE) if known else DEFAULT_BLOCK_SIZE


def resolve_mode(mode: str) -> str:
    name = ALIASES.get(mode, mode)
    if name not in MODES:
        raise ExportError(f"unknown quantization mode {mode!r}; choose int8 (= int8-dynamic), {', '.join(MODES)}")
    return name


def _gemm_to_matmul(model: onnx.ModelProto) -> None:
    """Gemm(x, W, transB=1) -> MatMul(x, W^T): the quantizers handle MatMul, not the tied lm_head's Gemm."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type != "Gemm" or len(node.input) != 2 or not transposed or node.input[1] not in initializers:
            continue
        source = initializers[node.input[1]]
        weight = numpy_helper.to_array(source, base_dir="")
        # Our graphs' only Gemm is the output projection (the head graph's).
        name = "lm_head" if "lm_head" not in initializers else node.input[1] + ".transposed"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        node.op_type, node.input[1] = "MatMul", name
        del node.attribute[:]
        if not any(source.name in other.input for other in model.graph.node):
            model.graph.initializer.remove(source)  # the [V, d] original is not written again


def _kept_nodes(model: onnx.ModelProto, patterns: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """MatMul nodes whose constant weight matches a keep-fp32 pattern -> (node names, weight names)."""
    initializers = {t.name for t in model.graph.initializer}
    nodes, weights = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers and \
                any(fnmatch.fnmatchcase(node.input[1], p) for p in patterns):
            nodes.append(node.name)
            weights.append(node.input[1])
    return nodes, weights


def _type_contrib_outputs(model: onnx.ModelProto) -> int:
    """onnx's shape inference leaves com.microsoft ops untyped; every output of ours (FastGelu, MultiHeadAttention,
    Skip[Simplified]LayerNormalization) has the type of the first input. Returns how many outputs it typed."""
    known = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info]}
    known.update({t.name: t.data_type for t in model.graph.initializer})
    typed = 0
    for node in model.graph.node:
        if node.domain != "com.microsoft" or node.input[0] not in known:
            continue
        for output in node.output:
            if output and output not in known:
                known[output] = known[node.input[0]]
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(output, known[node.input[0]], None))
                typed += 1
    return typed


def _drop_fp16_round_trips(model: onnx.ModelProto) -> None:
    """onnxruntime's fp16 converter passes every fp32 node's output through fp16 on its way to the next fp32
    node (Cast to fp16, Cast back): an inf for mT5's residual stream. Read the fp32 value directly instead."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}

    def cast_to(node, elem_type: int) -> bool:
        return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type
                                                                    for a in node.attribute)

    for node in graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if cast_to(node, onnx.TensorProto.FLOAT) and cast_to(source, onnx.TensorProto.FLOAT16):
            node.input[0] = source.input[0]  # a no-op cast where that is fp32 already (an int mask, say, is not)
    outputs = {o.name for o in graph.output}
    while True:  # casts nothing reads any more
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & used]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


@contextlib.contextmanager
def _without_preprocessing_advice():
    """quantize_dynamic logs "Please consider to run pre-processing" on the root logger for every graph. That
    pre-processing (shape inference, fusions) serves static quantization's calibration; weight-only and dynamic
    MatMul quantization of our graphs do not use it, so the advice is noise to a user."""
    import logging

    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _quantize_graph(source: str, target: str, mode: str, block_size: int,
                    keep_fp32: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Write the variant of one graph -> (quantization details, the weights kept fp32)."""
    import logging

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(source, load_external_data=False)
    if mode == "fp16":
        # The fp16 pass places its casts by the type of every intermediate. Inferred on the graph alone:
        # in-memory shape inference stops at protobuf's 2 GB.
        model = onnx.shape_inference.infer_shapes(model)
        while _type_contrib_outputs(model):  # each round types what follows the contrib ops typed last round
            model = onnx.shape_inference.infer_shapes(model)
    onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(source)))
    from .restrict import join_head_blocks

    join_head_blocks(model, os.path.dirname(os.path.abspath(source)))  # a head in row blocks is quantized as one
    _gemm_to_matmul(model)
    for node in model.graph.node:  # quantizers skip nameless nodes' exclusions; every node gets a name
        node.name = node.name or f"{node.op_type}_{id(node)}"
    excluded, kept = _kept_nodes(model, keep_fp32)
    if mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                             op_block_list=FP32_OPS, node_block_list=excluded)
        _drop_fp16_round_trips(converted)
        onnx.save(converted, target, save_as_external_data=True, location=os.path.basename(target) + ".data")
        return {"method": "mixed-precision", "weight_type": "float16", "ops": ["MatMul", "Softmax"],
                "fp32_ops": FP32_OPS, "io_dtype": "float32", "providers": ["cuda", "cpu"]}, kept
    if mode == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _without_preprocessing_advice():
            quantize_dynamic(model, target, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return {"method": "dynamic", "weight_type": "int8", "per_channel": True, "ops": ["MatMul"],
                "activations": "uint8, quantized per call (DynamicQuantizeLinear)", "providers": ["cpu"]}, kept
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 8 if mode == "int8-weight" else 4
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=excluded)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=True)
    return {"method": "weight-only", "weight_type": f"int{bits}", "block_size": block_size, "symmetric": True,
            "ops": ["MatMul"], "op": "com.microsoft.MatMulNBits", "accuracy_level": 4, "providers": ["cpu", "cuda"]}, kept


EMBEDDINGS_FILE = "embeddings.bin"


def _external_array(tensor: onnx.TensorProto, folder: str) -> np.ndarray:
    """An fp32 initializer stored as external data, memory-mapped."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    return np.memmap(os.path.join(folder, info["location"]), dtype=np.float32, mode="r",
                     offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))


def _quantize_embeddings(target: str, vocab_size: int, bits: int, block_size: int, patterns: tuple[str, ...],
                         tables: WeightFile, tied: str | None = None) -> tuple[list[str], list[str]]:
    """onnxruntime's quantizers leave the embedding an fp32 Gather, copied into every graph's data file (mt0-small
    int8: 1.2 GB of its 1.3 GB fp32 folder). Replace each fp32 Gather over a [vocab, d] table by
    GatherBlockQuantized over `bits`-bit blocks written once to `tables` (the variant's embeddings.bin, shared by
    mT0's encoder and decoder), as `export --quantize` does, and drop the fp32 table from the graph's data file.
    The table named `tied` (int8-dynamic, a head tied to it) becomes per-row int8 rows instead, read by a Gather
    and by the head add_variant writes over the same rows. Tables matching a keep-fp32 pattern stay.
    -> (tables quantized, tables kept fp32)."""
    model = onnx.load(target, load_external_data=False)
    folder = os.path.dirname(target)
    initializers = {t.name: t for t in model.graph.initializer}
    quantized, kept = [], []
    for index, node in reversed(list(enumerate(model.graph.node))):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or list(table.dims[:1]) != [vocab_size] or len(table.dims) != 2 \
                or table.data_type != onnx.TensorProto.FLOAT or node.input[1] in initializers:
            continue
        if any(fnmatch.fnmatchcase(table.name, p) for p in patterns):
            kept.append(table.name)
            continue
        depth = table.dims[1]
        if table.name == tied:
            base = int8_rows_table(tables, table.name, ArraySource({table.name: _external_array(table, folder)}),
                                   table.name)
            scales = tables.tensor(base + ".scale[V,1]", base + ".scale", (vocab_size, 1))
            model.graph.initializer.extend([tables.tensor(base, base), scales])
            replacement = int8_rows_lookup(base, scales.name, node.input[1], node.output[0])
            model.graph.node.remove(node)
            for offset, new_node in enumerate(replacement):
                model.graph.node.insert(index + offset, new_node)
            quantized.append(table.name)
            continue
        base = block_table(tables, table.name, ArraySource({table.name: _external_array(table, folder)}), table.name,
                           bits, block_size)
        blocks = tables.placements[base + ".scales"].shape[1]
        model.graph.initializer.extend([tables.tensor(base, base, (vocab_size, blocks * block_size * bits // 8)),
                                        tables.tensor(base + ".scales", base + ".scales")])
        rows = node.output[0]
        padded = blocks * block_size != depth
        gathered = rows + ".padded" if padded else rows
        replacement = onnx.helper.make_node("GatherBlockQuantized", [base, node.input[1], base + ".scales"], [gathered],
                                            name=node.name, domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                                            block_size=block_size, bits=bits)
        model.graph.node.remove(node)
        model.graph.node.insert(index, replacement)
        if padded:  # the last block is zero-padded: keep the first d columns
            bounds = [numpy_helper.from_array(np.array(v, np.int64), f"{rows}.{k}")
                      for k, v in (("start", [0]), ("end", [depth]), ("axis", [-1]))]
            model.graph.initializer.extend(bounds)
            model.graph.node.insert(index + 1, onnx.helper.make_node("Slice", [gathered] + [b.name for b in bounds],
                                                                     [rows], name=node.name + ".slice"))
        quantized.append(table.name)
    if quantized:
        for name in set(quantized):
            if not any(name in n.input for n in model.graph.node):
                model.graph.initializer.remove(initializers[name])
        _compact_external_data(model, folder)
        with open(target, "wb") as handle:
            handle.write(model.SerializeToString())
        onnx.checker.check_model(target)
    return sorted(set(quantized)), sorted(set(kept))


def _external_place(tensor: onnx.TensorProto) -> tuple[str, int] | None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    if tensor.data_location != onnx.TensorProto.EXTERNAL or "location" not in info:
        return None
    return info["location"], int(info.get("offset", 0))


def _tied_table(folder: str, files: dict) -> tuple[str, np.ndarray] | None:
    """(name, fp32 rows memory-mapped) of the embedding table the fp32 head reads, when the head is tied to it
    (its first weight starts where a graph's [V, d] Gather table starts, in the same file), else None."""
    head = onnx.load(os.path.join(folder, files["head"]["path"]), load_external_data=False)
    weights = {t.name: t for t in head.graph.initializer}
    first = next((weights[n.input[1]] for n in head.graph.node if n.op_type in ("Gemm", "MatMul")
                  and n.input[1] in weights), None)
    place = _external_place(first) if first is not None else None
    if place is None:
        return None
    for role, entry in files.items():
        if role in ("head", *OPTIONAL_ROLES):
            continue
        graph = onnx.load(os.path.join(folder, entry["path"]), load_external_data=False).graph
        tables = {t.name: t for t in graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT}
        for node in graph.node:
            table = tables.get(node.input[0]) if node.op_type == "Gather" else None
            if table is not None and _external_place(table) == place:
                return table.name, _external_array(table, os.path.dirname(os.path.join(folder, entry["path"])))
    return None


def _tied_int8_head(partial: str, tables: WeightFile, name: str, rows: np.ndarray) -> None:
    """Write the variant's head in the export's int8-dynamic form over the table's int8 rows in `tables`
    (written by _quantize_embeddings): QGemm in row blocks, no weight of its own."""
    from .families.common import output_graphs

    graph = output_graphs(rows.shape[1], ArraySource({name: rows}), name, tables, name, WeightPlan("int8-dynamic"),
                          tied=True)[0][0]
    save_graph(partial, graph, "head.onnx")


def _compact_external_data(model: onnx.ModelProto, folder: str) -> None:
    """Rewrite the data files of `model`'s initializers (but the variant's shared tables) with only the bytes they
    still use, large tensors on page boundaries (memory-mapped by onnxruntime)."""
    by_file: dict[str, list[onnx.TensorProto]] = {}
    for tensor in model.graph.initializer:
        info = {entry.key: entry.value for entry in tensor.external_data}
        if tensor.data_location == onnx.TensorProto.EXTERNAL and info.get("location") != EMBEDDINGS_FILE:
            by_file.setdefault(info["location"], []).append(tensor)
    for location, tensors in by_file.items():
        old, new = os.path.join(folder, location), os.path.join(folder, location + ".compact")
        end = 0
        with open(old, "rb") as source, open(new, "wb") as target:
            for tensor in tensors:
                entries = {entry.key: entry for entry in tensor.external_data}
                length = int(entries["length"].value) if "length" in entries else \
                    int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                source.seek(int(entries["offset"].value) if "offset" in entries else 0)
                data = source.read(length)
                alignment = PAGE if length >= PAGE_ALIGNED_FROM else ALIGNMENT
                end += (-end) % alignment
                target.seek(end)
                target.write(data)
                if "offset" not in entries:
                    entry = tensor.external_data.add()
                    entry.key = "offset"
                    entries["offset"] = entry
                entries["offset"].value = str(end)
                end += length
            target.truncate(end)
        os.replace(new, old)


def check_options(block_size: int | None, keep_fp32, name: str | None) -> tuple[str, ...]:
    """Typed errors for bad quantization options, before anything is written (block_size None: the defaults)."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or
                                   block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"block size must be a power of two >= 16 (MatMulNBits), not {block_size!r}")
    patterns = (keep_fp32,) if isinstance(keep_fp32, str) else tuple(keep_fp32 or ())
    if any(not isinstance(p, str) or not p for p in patterns):
        raise ExportError(f"keep-fp32 patterns must be non-empty strings, not {keep_fp32!r}")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)
                             or name == "fp32"):
        raise ExportError(f"variant name {name!r} must be letters, digits, '.', '_' or '-' (and not fp32)")
    return patterns


@contextlib.contextmanager
def variant_folder(folder: str, name: str):
    """A temporary subfolder to write variant `name` into, renamed to folder/name when the block succeeds (an
    older one replaced) and removed when it fails: a variant appears complete or not at all."""
    partial = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder)
    os.chmod(partial, 0o755)  # mkdtemp's 0700 would hide the variant from a service running as another user
    try:
        yield partial
        final = os.path.join(folder, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def add_variant(folder: str, manifest: dict, mode: str, block_size: int | None = None,
                keep_fp32=None, name: str | None = None) -> str:
    """Write variant `name` (default: the mode's name) under folder/name/ and add it to `manifest` (the caller
    writes the manifest). block_size: None for the family's default (default_block_size). keep_fp32: fnmatch
    patterns of weight names whose MatMuls stay fp32 (None: the mode's default, see default_keep_fp32)."""
    import onnxruntime

    mode = resolve_mode(mode)
    if block_size is None:
        block_size = default_block_size(mode, manifest["family"])
    patterns = check_options(block_size, default_keep_fp32(mode) if keep_fp32 is None else keep_fp32, name)
    name = name or mode
    kept: dict[str, list[str]] = {}
    details: dict = {}
    fp32_files = manifest["variants"]["fp32"]["files"]
    roles = [role for role in fp32_files if role not in OPTIONAL_ROLES]
    embedded: set[str] = set()
    bits = WeightPlan(mode).bits  # of the embedding's blocks, as the export writes them
    # int8-dynamic with a tied head: onnxruntime's quantizer would write the head over the transposed table, a
    # second copy; the export's form instead (QGemm over the embedding's int8 rows), written below
    tied = _tied_table(folder, fp32_files) if mode == "int8-dynamic" else None
    if tied is not None and any(fnmatch.fnmatchcase(n, p) for n in (tied[0], "lm_head") for p in patterns):
        tied = None  # the table or the head stays fp32: nothing to share
    with variant_folder(folder, name) as partial:
        tables = WeightFile(EMBEDDINGS_FILE).bind(partial)
        for role in roles:
            if tied is not None and role == "head":
                kept[role] = []  # written after the embedding's rows (_tied_int8_head)
                continue
            entry = fp32_files[role]
            target = os.path.join(partial, f"{role}.onnx")
            details, kept[role] = _quantize_graph(os.path.join(folder, entry["path"]), target, mode, block_size,
                                                  patterns)
            if mode != "fp16":
                done, table_kept = _quantize_embeddings(target, int(manifest["tokens"]["vocab_size"]), bits, block_size,
                                                        patterns, tables, tied[0] if tied else None)
                embedded.update(done)
                kept[role] += table_kept
        if tied is not None:
            _tied_int8_head(partial, tables, *tied)
            details["head"] = f"DynamicQuantizeLinear + com.microsoft.QGemm (transB) over the int8 rows of {tied[0]}"
        if not tables.placements:
            os.remove(os.path.join(partial, EMBEDDINGS_FILE))
    files = {role: file_entry(folder, os.path.join(name, f"{role}.onnx")) for role in roles}
    if "screen" in fp32_files and "lm_head" in kept.get("head", []):
        files["screen"] = fp32_files["screen"]  # the head is still the fp32 projection the screen bounds
    details.update(onnxruntime=onnxruntime.__version__, mode=mode, kept_fp32={"patterns": list(patterns), "weights": kept})
    if tied is not None:
        details["embedding"] = f"int8 rows, one scale per row, shared with the head: {tied[0]}"
    elif embedded:
        details["embedding"] = (f"com.microsoft.GatherBlockQuantized, {bits}-bit blocks of "
                                f"{block_size}, stored once in {name}/{EMBEDDINGS_FILE}: {', '.join(sorted(embedded))}")
    manifest["variants"][name] = {"quantization": details, "files": files}
    record_aliases(manifest)
    return name


def record_aliases(manifest: dict) -> None:
    """The manifest's `aliases`: a mode alias (int8) loads the variant it resolved to, so the name a user typed at
    export or quantize time is the name that loads."""
    aliases = {alias: mode for alias, mode in ALIASES.items() if mode in manifest["variants"]}
    if aliases:
        manifest["aliases"] = aliases


def quantize_folder(folder: str, mode: str, force: bool = False, block_size: int | None = None,
                    keep_fp32=None, name: str | None = None) -> str:
    """Add a quantized variant to an existing export (block_size None: the family's default for the mode); the
    manifest is replaced atomically."""
    manifest = read_manifest(folder)
    check_options(block_size, keep_fp32, name)
    name = name or resolve_mode(mode)
    if name in manifest.variants and not force:
        raise OutputExistsError(f"{folder} already has variant {name}; pass --force to rebuild it.")
    data = manifest.data
    add_variant(folder, data, mode, block_size, keep_fp32, name)
    write_manifest(folder, data)
    return name
