"""The one place InferenceSessions are made."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class ThreadPolicy:
    """How a session's intra-op threads wait between the ops of a run and between runs (tuning.py measures
    which is fastest on a machine)."""

    name: str
    threads: int | None  # intra-op threads; None: onnxruntime's default (one per physical core)
    spinning: str  # "while running" (stopped when a run ends), "never", "always" (onnxruntime's default)
    summary: str

    def configure(self, options: ort.SessionOptions) -> None:
        """Set this policy's spinning on `options` (default_options sets its threads, unless the caller gives some)."""
        if self.spinning == "while running":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        elif self.spinning == "never":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")


POLICIES = (
    ThreadPolicy("spin-then-stop", None, "while running",
                 "one thread per core; idle threads spin during a run, and stop when it ends (the next session "
                 "gets the cores)"),
    ThreadPolicy("no-spin", None, "never", "one thread per core; idle threads sleep at once"),
    ThreadPolicy("spin", None, "always", "one thread per core; idle threads keep spinning after a run (onnxruntime's "
                 "default)"),
    ThreadPolicy("one-thread", 1, "while running", "every session on the calling thread alone"),
)
DEFAULT_POLICY = POLICIES[0]


def default_options(policy: ThreadPolicy = DEFAULT_POLICY, threads: int | None = None) -> ort.SessionOptions:
    """The options every session gets unless the caller passes its own: `policy` sets how its threads spin and, when
    `threads` is None, how many there are (tuning.py: measured once per machine; the default stops spinning when a
    run ends)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Memory patterns pay off for fixed shapes; here every decode step has a new one (the cache grows),
    # and the per-shape blocks cost 0.3 GB of peak memory at 8x4 beams on bloomz-560m.
    options.enable_mem_pattern = False
    policy.configure(options)
    _set_threads(options, policy.threads if threads is None else threads)
    return options


def prepacked_graph(path: str, cache: str) -> str:
    """The graph at `path` with onnxruntime's prepacked CPU weights saved beside it, in folder `cache`: loading it
    memory-maps the packed weights instead of packing them into a second, heap copy of the weights (RssAnon becomes
    RssFile: shared between processes, reclaimable, and no packing time). Packing depends on the CPU and the
    onnxruntime version, so both key the cache; it is written once, atomically."""
    stat = os.stat(path)
    key = hashlib.sha256(json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, ort.__version__,
                                     platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    folder = os.path.join(cache, f"{os.path.splitext(os.path.basename(path))[0]}-{key}")
    graph = os.path.join(folder, "packed.onnx")
    if os.path.isfile(graph):
        return graph
    os.makedirs(cache, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".packing-", dir=cache)
    os.chmod(partial, 0o755)  # readable by the other users a shared cache serves, as the export itself
    try:
        options = default_options()
        options.optimized_model_filepath = os.path.join(partial, "packed.onnx")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "packed.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        os.rename(partial, folder)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not os.path.isfile(graph):  # another process may have won the race
            raise
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ManifestError(f"onnxruntime could not prepack {path} into {cache}: {e}. Load without "
                            "prepacked_cache, or export the model again.") from e
    return graph


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def make_session(path: str, provider: str = "cpu", threads: int | None = None,
                 options: ort.SessionOptions | None = None, prepacked_cache: str | None = None,
                 policy: ThreadPolicy = DEFAULT_POLICY) -> ort.InferenceSession:
    """An InferenceSession on one provider, full graph optimizations, `threads` intra-op threads (None: the policy's).
    Given `options` are used as they are (but for `threads`); without them, `policy` sets the threads' spinning.
    prepacked_cache: a folder where the CPU provider's packed weights are saved once and memory-mapped from then on
    (see prepacked_graph)."""
    provider_name = resolve_provider(provider)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ProviderUnavailableError(f"threads must be a positive integer, not {threads!r}")
    if prepacked_cache is not None and provider_name == "CPUExecutionProvider" and options is None:
        path = prepacked_graph(path, os.fspath(prepacked_cache))
    if options is None:
        options = default_options(policy, threads)
    else:
        _set_threads(options, threads)
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


MADV_RANDOM, MADV_PAGEOUT = 1, 21  # <sys/mman.h>, Linux


def _madvise_mappings(paths: set[str], advice: int) -> None:
    """madvise(advice) over this process's mappings of the files `paths` (Linux; OSError where /proc or libc
    cannot be read)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                libc.madvise(start, end - start, advice)


def advise_random_access(paths: list[str]) -> None:
    """Tell the kernel that this process's mappings of the files `paths` (weights onnxruntime memory-maps from a
    graph's external data) are read at random, and drop their cached pages that no process has mapped. After
    loading, what is left mapped is read row by row (an embedding's Gather, the greedy screen's exact rows); the
    page cache holds those files in large folios (loading and the sha256 check read them in sequence), and a row
    read maps its whole folio: within a few hundred tokens the whole table was resident (mt0-small int4-weight:
    74 of 80 MB of embeddings.bin, 70 MB of peak RSS). With the hint and the drop, a row read brings in its page.
    Weights onnxruntime packed into its own copy are not affected. Linux only; elsewhere, or if anything fails,
    nothing is changed (it is advice)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        wanted = {os.path.realpath(p) for p in paths}
        _madvise_mappings(wanted, MADV_RANDOM)
        for path in wanted:  # cached pages not mapped yet leave the cache, to come back one page at a time
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)
    except (OSError, ValueError, AttributeError):
        pass


def page_out_weights(paths: list[str]) -> None:
    """Ask the kernel to reclaim what this process holds of its mappings of the weight files `paths`, once a session
    over them is made. onnxruntime packs the MatMul weights into copies of its own, but keeps some originals mapped
    and resident that it no longer reads (MatMulNBits' scales: 66 MB of bloomz-560m int4-weight's 546 MB after
    loading, 29 MB of them the head's); paged out after each session, they neither add to the next session's load
    peak nor stay resident, and a page read again (an embedding row) comes back from the file. MADV_PAGEOUT never
    loses data — a page another process maps, or one written to, is left or swapped, never dropped — so it is safe
    whatever else maps or unmaps meanwhile. Linux 5.4 and later; elsewhere, or if anything fails, nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _madvise_mappings({os.path.realpath(p) for p in paths}, MADV_PAGEOUT)
    except (OSError, ValueError, AttributeError):
        pass


# ---- one-node graphs the runtime makes itself (beam search's log_softmax and top-k, in onnxruntime) ----

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # protobuf writes a negative int64 as its 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an integer (varint) or a string / nested message (length-delimited)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


FLOAT, INT64 = 1, 7  # onnx.TensorProto's element types


def small_model(nodes: list[tuple[str, list[str], list[str], dict[str, int]]], inputs: list[tuple[str, int]],
                outputs: list[tuple[str, int]], initializers: dict[str, np.ndarray] | None = None,
                name: str = "small") -> bytes:
    """An ONNX model (opset 17) of `nodes` (op type, inputs, outputs, integer attributes) over 2-D tensors
    [rows, columns] (1-D [count] for int64 inputs), with float32 `initializers`. Serialized here, field by field of
    onnx.proto (ModelProto 1 ir_version, 7 graph, 8 opset_import; GraphProto 1 node, 2 name, 5 initializer,
    11 input, 12 output; NodeProto 1 input, 2 output, 4 op_type, 5 attribute; AttributeProto 1 name, 3 i, 20 type
    = INT (2); TensorProto 1 dims, 2 data_type, 8 name, 9 raw_data; ValueInfoProto 1 name, 2 type; TypeProto
    1 tensor_type; TypeProto.Tensor 1 elem_type, 2 shape; TensorShapeProto 1 dim; Dimension 2 dim_param),
    because the runtime does not depend on the onnx package."""
    def value(name: str, elem_type: int, io: str) -> bytes:
        axes = ["count"] if (elem_type == INT64 and io == "input") else ["rows", "columns"]
        shape = b"".join(_field(1, _field(2, axis)) for axis in axes)
        return _field(1, name) + _field(2, _field(1, _field(1, elem_type) + _field(2, shape)))

    def tensor(name: str, array: np.ndarray) -> bytes:
        array = np.ascontiguousarray(array, dtype="<f4")
        return b"".join(_field(1, int(d)) for d in array.shape) + _field(2, FLOAT) + _field(8, name) \
            + _field(9, array.tobytes())

    def node(op_type: str, names_in: list[str], names_out: list[str], attributes: dict[str, int]) -> bytes:
        return b"".join(_field(1, n) for n in names_in) + b"".join(_field(2, n) for n in names_out) \
            + _field(4, op_type) + b"".join(_field(5, _field(1, k) + _field(3, v) + _field(20, 2))
                                            for k, v in attributes.items())

    graph = b"".join([*(_field(1, node(*n)) for n in nodes), _field(2, name),
                      *(_field(5, tensor(n, a)) for n, a in (initializers or {}).items()),
                      *(_field(11, value(n, t, "input")) for n, t in inputs),
                      *(_field(12, value(n, t, "output")) for n, t in outputs)])
    return b"".join([_field(1, 8), _field(7, graph), _field(8, _field(2, 17))])


def one_node_model(op_type: str, inputs: list[tuple[str, int]], outputs: list[tuple[str, int]],
                   attributes: dict[str, int]) -> bytes:
    """small_model of one node."""
    return small_model([(op_type, [n for n, _ in inputs], [n for n, _ in outputs], attributes)], inputs, outputs,
                       name=op_type.lower())


def log_softmax_model() -> bytes:
    """LogSoftmax over the last axis: float32 logits [rows, columns] -> log_probs."""
    return one_node_model("LogSoftmax", [("logits", FLOAT)], [("log_probs", FLOAT)], {"axis": -1})


def top_k_model() -> bytes:
    """TopK per row, largest first, ties in index order: float32 scores [rows, columns], k [1] -> values, indices."""
    return one_node_model("TopK", [("scores", FLOAT), ("k", INT64)], [("values", FLOAT), ("indices", INT64)],
                          {"axis": -1, "largest": 1, "sorted": 1})


def small_session(model: bytes, threads: int | None = None,
                  policy: ThreadPolicy = DEFAULT_POLICY) -> ort.InferenceSession:
    """A session over one of the runtime's own small models, on the CPU (log_softmax: 6 ms for 32 x 250k logits
    on 2 cores, where numpy took 21 ms with two threads, a sixth of mt0-small's int8 step at 8x4 beams)."""
    return ort.InferenceSession(model, sess_options=default_options(policy, threads), providers=["CPUExecutionProvider"])


def _set_threads(options: ort.SessionOptions, threads: int | None) -> None:
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
