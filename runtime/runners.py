"""The graphs behind one loaded model: encode / prefill / decode_step for each kind, then the head.

The KV cache lives in OrtValues on the provider's device and is fed back as the next step's past
through IO binding; the decoder graphs reorder it for beam search themselves (beam_idx input), so
no cache is copied or concatenated in Python. On the CPU the presents are written into two
request-sized buffers used in turn; on CUDA they are device OrtValues.

The decoder stops at the hidden state [rows, d]; `logits` runs the output projection (head graph)
and `screen` the greedy screen (export/screen.py), which certifies the argmax from a quarter of
the projection's bytes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .errors import InferenceError
from .generation import EXP_FLOOR, host_map, log_softmax_block, sampled_top_k
from .manifest import Manifest
from .session import DEFAULT_POLICY, log_softmax_model, small_session, top_k_model


@dataclass
class DecodeState:
    """Everything one request carries between steps. [rows] = batch * expand (beams or samples)."""

    input_ids: np.ndarray  # [batch, prompt] the (padded) prompt
    attention_mask: np.ndarray  # [rows, total] decoder kind: grows by one column per step
    expand: int  # rows per prompt
    past: list[ort.OrtValue] = field(default_factory=list)  # per layer: key, value
    cross: list[ort.OrtValue] = field(default_factory=list)  # seq2seq: per layer cross key, value
    encoder_mask: np.ndarray | None = None  # seq2seq: [rows, source]
    capacity: int = 0  # the longest cache the request can need (0: unknown)
    # CPU: flat buffers, one per present, sized for the request: one set (written in place) or two (used in turn)
    buffers: list[list[np.ndarray]] | None = None
    flip: int = 0
    # the shared-buffer decoder: per cache input a [rows, heads, capacity, d] buffer that `past` views whole, of
    # which the first `length` positions hold the cache (None: `past` holds the cache at its own length)
    shared: list[np.ndarray] | None = None
    length: int = 0
    common: int = 0  # cache positions every row of a prompt holds alike (a decoder's prompt, once beams branched)
    # the shared-buffer decoder's IO binding, kept between steps while its buffers and rows stay (see _decode_shared),
    # with the [rows, d] buffer it writes the hidden state into
    binding: ort.IOBinding | None = None
    hidden: np.ndarray | None = None


def _run(session: ort.InferenceSession, device: str, cpu_inputs: dict[str, np.ndarray],
         value_inputs: dict[str, ort.OrtValue], device_outputs: list[str], cpu_outputs: list[str],
         output_values: dict[str, ort.OrtValue] | None = None) -> list[ort.OrtValue]:
    """One run through IO binding; outputs in the order: output_values, cpu_outputs, device_outputs."""
    binding = session.io_binding()
    for name, array in cpu_inputs.items():
        binding.bind_cpu_input(name, array)
    for name, value in value_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name, value in (output_values or {}).items():
        binding.bind_ortvalue_output(name, value)
    for name in cpu_outputs:
        binding.bind_output(name, "cpu")
    for name in device_outputs:
        binding.bind_output(name, device)
    _execute(session, binding)
    return binding.get_outputs()


WIDE_SHARE = 0.25  # a row is wide when more than this share of a sample of its logits is 87 below the row's max
_SAMPLE_STRIDE = 509  # every 509th column: ~490 of 250k, one cache line each
_denormals: list[bool] = []  # slow_denormals' answer, once per process
_denormals_lock = threading.Lock()
SAMPLED_TOP_K_MIN = 1 << 21  # scores from which top_k may take generation.sampled_top_k (8 rows of 250k: 2x4 beams)
_top_k: list[bool] = []  # sampled_top_k_faster's answer, once per process
_top_k_lock = threading.Lock()


def row_maxima(scores: np.ndarray, threads: int | None = None) -> np.ndarray:
    """[rows, columns] -> each row's maximum [rows, 1], on `threads` host threads for a large array."""
    maxima = np.empty((scores.shape[0], 1), scores.dtype)

    def four_rows(start: int) -> None:
        maxima[start:start + 4] = scores[start:start + 4].max(axis=1, keepdims=True)
    host_map(four_rows, list(range(0, scores.shape[0], 4)), threads if scores.size >= 1 << 20 else 1)
    return maxima


def wide_rows(scores: np.ndarray, maxima: np.ndarray | None = None) -> np.ndarray:
    """[rows, columns] float32 -> bool [rows]: which rows' exps would mostly be denormals: a sample of each row against
    the row's exact maximum (maxima [rows, 1], computed when not given: a sample's can miss a peak by far), so the row
    alone decides."""
    maxima = row_maxima(scores) if maxima is None else maxima
    return (scores[:, ::_SAMPLE_STRIDE] < maxima + EXP_FLOOR).mean(axis=1) > WIDE_SHARE


def slow_denormals() -> bool:
    """Whether onnxruntime's LogSoftmax on this CPU is over 3x slower on rows whose exps are denormals than on others
    (measured once per process on one thread, ~15 ms: the Intel Xeon guest 6.6x; it handles denormals in microcode)."""
    if _denormals:  # every step asks: no lock once known
        return _denormals[0]
    with _denormals_lock:
        if not _denormals:
            session = small_session(log_softmax_model(), 1, DEFAULT_POLICY)
            rng = np.random.default_rng(0)
            normal = rng.uniform(-80, 0, (4, 16384)).astype(np.float32)
            wide = rng.uniform(-150, -88, (4, 16384)).astype(np.float32)
            normal[:, 0] = wide[:, 0] = 0

            def best(x: np.ndarray) -> float:
                times = []
                for _ in range(4):
                    began = time.perf_counter()
                    session.run(None, {"logits": x})
                    times.append(time.perf_counter() - began)
                return min(times[1:])
            _denormals.append(best(wide) > 3 * best(normal))
        return _denormals[0]


def sampled_top_k_faster(scores: np.ndarray, k: int, threads: int | None, session: ort.InferenceSession) -> bool:
    """Whether generation.sampled_top_k beats onnxruntime's TopK (`session`) on this machine: decided once per process,
    on the first beam search step large enough to matter (`scores`, which both then rank: best of 3 each,
    interleaved, ~50 ms at 32 x 250112). The Intel Xeon guest, 32 x 250112 log-probs at 2 threads: 7.0 against
    10.3 ms."""
    if _top_k:
        return _top_k[0]
    with _top_k_lock:
        if not _top_k:
            sampled, whole = [], []
            feeds = {"scores": scores, "k": np.array([k], np.int64)}
            for _ in range(3):
                began = time.perf_counter()
                sampled_top_k(scores, k, threads)
                sampled.append(time.perf_counter() - began)
                began = time.perf_counter()
                session.run(None, feeds)
                whole.append(time.perf_counter() - began)
            _top_k.append(min(sampled) < min(whole))
        return _top_k[0]


def _execute(session: ort.InferenceSession, binding: ort.IOBinding) -> None:
    try:
        session.run_with_iobinding(binding)
    except Exception as e:
        raise InferenceError(f"onnxruntime failed running {session._model_path}: {e}") from e


class Runner:
    """Shared by both kinds: the cache names and the empty first-step past."""

    def __init__(self, manifest: Manifest, sessions: dict[str, ort.InferenceSession], device: str,
                 shared_cache: bool = False):
        self.manifest, self.sessions, self.device = manifest, sessions, device
        self.shared_cache = shared_cache  # sessions["decoder"] is the shared-buffer form (CPU): see _decode_shared
        cache = manifest.cache
        self.num_layers, self.num_heads, self.head_dim = cache["num_layers"], cache["num_heads"], cache["head_dim"]
        self.cache_dtype = np.dtype(cache.get("dtype", "float32"))
        self.in_place = bool(cache.get("present_may_overwrite_past", False))  # see _presents
        self._own_sessions: dict = {}  # see _own
        layers = range(self.num_layers)
        self.past_names = [n for i in layers for n in (cache["past_key"].format(layer=i),
                                                       cache["past_value"].format(layer=i))]
        self.present_names = [n for i in layers for n in (cache["present_key"].format(layer=i),
                                                          cache["present_value"].format(layer=i))]
        vocab = int(manifest.tokens["vocab_size"])
        self.vocabulary = None  # a restricted variant's Vocabulary: which token each logit column is (Model sets it)
        self._columns: int | None = None  # the head's logit columns, once it has run (log_probs by row)
        self.threads: int | None = None  # the model's threads (None: the policy's)
        self.policy = DEFAULT_POLICY  # the model's thread policy (Model sets it)
        self.screen_candidates = max(1, min(int(manifest.data.get("greedy_screen", {}).get("default_candidates", 128)),
                                            vocab - 1))

    def _empty_past(self, rows: int) -> list[ort.OrtValue]:
        shape = [rows, self.num_heads, 0, self.head_dim]  # [rows, heads, 0, d]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self.device, 0)
                for _ in self.past_names]

    @staticmethod
    def _attend_new(state: DecodeState, rows: int) -> None:
        """The decoder's mask gains the position of the token this step feeds ([rows, total], one column more)."""
        state.attention_mask = np.concatenate([state.attention_mask, np.ones((rows, 1), np.int64)], axis=1)

    def _decode(self, state: DecodeState, feeds: dict[str, np.ndarray], beam_idx: np.ndarray) -> np.ndarray:
        """One decoder call: feeds + past -> hidden [rows, d] on the host; presents stay on the device."""
        if self.shared_cache:
            return self._decode_shared(state, feeds, beam_idx)
        values = dict(zip(self.past_names, state.past))
        values.update(zip(self.cross_names, state.cross))
        feeds["beam_idx"] = beam_idx
        rows, new = feeds["input_ids"].shape
        presents = self._presents(state, rows, self.past_length(state) + new)
        outputs = _run(self.sessions["decoder"], self.device, feeds, values, [], ["hidden"], presents)
        state.past = list(presents.values())
        return outputs[-1].numpy()

    def _decode_shared(self, state: DecodeState, feeds: dict[str, np.ndarray], beam_idx: np.ndarray) -> np.ndarray:
        """One call of the shared-buffer decoder: each layer's past and present are one buffer, bound as both, that
        the graph writes this step's keys and values into. Beam search's reorder happens here, in place, on the
        rows that change (greedy and sampling never copy the cache); the buffers grow (doubling) when the request's
        length was not known. The binding of the cache (two OrtValues per layer) and of the hidden state is made
        once and kept in the state while the buffers and the rows stay: a step binds only its feeds (binding ~100
        values a step was ~0.4 ms of a 5-14 ms B=1 step on 2 vCPUs)."""
        rows, new = feeds["input_ids"].shape
        past = self.past_length(state)
        self._shared_buffers(state, rows, past + new)
        moved = np.flatnonzero(beam_idx != np.arange(rows))
        if moved.size and past:  # each row that continues another beam takes its cache (numpy copies release the GIL)
            sources = beam_idx[moved]
            # beams of one prompt hold its positions alike: only what they generated differs
            start = min(state.common, past) if (sources // state.expand == moved // state.expand).all() else 0
            groups = np.array_split(np.arange(len(state.shared)), self.threads or os.cpu_count() or 1)

            def reorder(group: np.ndarray) -> None:
                for index in group:
                    state.shared[index][moved, :, start:past] = state.shared[index][sources, :, start:past]

            host_map(reorder, [group for group in groups if group.size], self.threads)
        session = self.sessions["decoder"]
        if state.binding is None or state.hidden.shape[0] != rows:  # hidden is bound with the binding
            state.past = [ort.OrtValue.ortvalue_from_numpy(buffer[:rows]) for buffer in state.shared]
            width = next(output.shape[-1] for output in session.get_outputs() if output.name == "hidden")
            state.hidden = np.empty((rows, int(width)), np.float32)
            state.binding = session.io_binding()
            for name, value in [*zip(self.past_names, state.past), *zip(self.cross_names, state.cross)]:
                state.binding.bind_ortvalue_input(name, value)
            for name, value in zip(self.present_names, state.past):
                state.binding.bind_ortvalue_output(name, value)
            state.binding.bind_ortvalue_output("hidden", ort.OrtValue.ortvalue_from_numpy(state.hidden))
        for name, array in feeds.items():
            state.binding.bind_cpu_input(name, array)
        _execute(session, state.binding)
        state.length = past + new
        return state.hidden.copy()

    def _shared_buffers(self, state: DecodeState, rows: int, length: int) -> None:
        """state.shared with room for `rows` rows of `length` positions: made (or grown) with the cache copied in."""
        have = state.shared
        if have is not None and have[0].shape[0] >= rows and have[0].shape[2] >= length:
            return
        cache = self.cache_arrays(state)
        rows_max = max(rows, state.input_ids.shape[0] * state.expand)
        # the request's length when it was given (begin), else room to grow: copies stay O(1) per token
        capacity = state.capacity if state.capacity >= length else max(2 * length, 16)
        state.shared, state.binding = [], None
        for array in cache:
            buffer = np.empty((rows_max, self.num_heads, capacity, self.head_dim), self.cache_dtype)
            buffer[:array.shape[0], :, :array.shape[2]] = array
            state.shared.append(buffer)

    def past_length(self, state: DecodeState) -> int:
        """Cache positions the state holds."""
        return state.length if state.shared is not None else state.past[0].shape()[2]

    def cache_arrays(self, state: DecodeState) -> list[np.ndarray]:
        """The cache at its length, [rows, heads, length, d] per input (views, on the host)."""
        if state.shared is not None:
            rows = state.past[0].shape()[0]
            return [buffer[:rows, :, :state.length] for buffer in state.shared]
        return [value.numpy() for value in state.past]

    def _presents(self, state: DecodeState, rows: int, length: int) -> dict[str, ort.OrtValue]:
        """Where this step's presents [rows, heads, length, d] go, allocated outside onnxruntime's arena.

        On the CPU they live in buffers sized for the whole request, so a cache that grows by one position per
        step is never allocated again. When the export says a graph reads each past only through the Gather that
        reorders it (into a buffer of its own) before it writes the present, the present is written over its
        past: one cache in memory (bloomz-560m int8 at 8x4 beams: 352 MB less at the peak). Other graphs alternate
        between two sets, reading the past from one while writing the present to the other."""
        shape = [rows, self.num_heads, length, self.head_dim]
        size = rows * self.num_heads * length * self.head_dim
        if self.device != "cpu" or not state.capacity or length > state.capacity:
            return {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self.device, 0)
                    for name in self.present_names}
        if state.buffers is None:
            rows_max = max(rows, state.input_ids.shape[0] * state.expand)
            count = rows_max * self.num_heads * state.capacity * self.head_dim
            state.buffers = [[np.empty(count, self.cache_dtype) for _ in self.present_names]
                             for _ in range(1 if self.in_place else 2)]
        state.flip = (state.flip + 1) % len(state.buffers)
        return {name: ort.OrtValue.ortvalue_from_numpy(buffer[:size].reshape(shape))
                for name, buffer in zip(self.present_names, state.buffers[state.flip])}

    # ---- continuous batching: rows join and leave a running batch between steps (TGI's filter / concatenate) ----

    @staticmethod
    def shape_key(state: DecodeState) -> tuple[int, int]:
        """States with equal keys hold caches of equal lengths: they join without padding."""
        source = state.encoder_mask.shape[1] if state.encoder_mask is not None else 0
        return state.attention_mask.shape[1], source

    def keep(self, state: DecodeState, rows: np.ndarray) -> None:
        """Drop every row of the state but `rows` (cache, cross cache and masks), and the cache positions no kept
        row attends (the left padding of rows that left a padded batch, the cross cache's right padding)."""
        mask = state.attention_mask[rows]  # [kept, total]
        start = int(np.argmax(mask.any(axis=0)))
        source = slice(None)
        if state.encoder_mask is not None:
            encoder = state.encoder_mask[rows]  # [kept, source]
            source = slice(0, int(np.flatnonzero(encoder.any(axis=0))[-1]) + 1)
            state.encoder_mask = encoder[:, source]

        def take(arrays, positions):
            return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a[:, :, positions][rows]), self.device, 0)
                    for a in arrays]

        state.past = take(self.cache_arrays(state), slice(start, None))
        state.cross = take([v.numpy() for v in state.cross], source)
        state.attention_mask, state.input_ids = mask[:, start:], state.input_ids[rows]
        state.buffers, state.capacity, state.shared, state.common, state.binding = None, 0, None, 0, None

    def join(self, states: Sequence[DecodeState]) -> DecodeState:
        """The rows of the states in one: caches padded on the left to one length (masked there; ALiBi and mT5's
        relative bias depend on distances), cross caches padded on the right. States with equal shape keys join
        with nothing padded, and then a row's numbers are those it has alone; padded, they are not bit for bit:
        onnxruntime's CPU MatMul and ReduceSum group a sum's terms by position, so a row padded to another
        length rounds differently and a near-tie of a greedy step can flip."""
        if len(states) == 1:
            return states[0]

        def pad(array: np.ndarray, axis: int, size: int, on_left: bool) -> np.ndarray:
            padding = [(0, 0)] * array.ndim
            missing = size - array.shape[axis]
            padding[axis] = (missing, 0) if on_left else (0, missing)
            return np.pad(array, padding) if missing else array

        def merged(arrays: list[np.ndarray], axis: int, on_left: bool) -> np.ndarray:
            size = max(a.shape[axis] for a in arrays)
            return np.concatenate([pad(a, axis, size, on_left) for a in arrays])

        def merged_values(lists: list[list[np.ndarray]], axis: int, on_left: bool) -> list[ort.OrtValue]:
            return [ort.OrtValue.ortvalue_from_numpy(merged(list(layer), axis, on_left), self.device, 0)
                    for layer in zip(*lists)]

        return DecodeState(
            input_ids=merged([s.input_ids for s in states], 1, True),
            attention_mask=merged([s.attention_mask for s in states], 1, True), expand=1,
            past=merged_values([self.cache_arrays(s) for s in states], 2, True),
            cross=merged_values([[v.numpy() for v in s.cross] for s in states], 2, False),
            encoder_mask=None if states[0].encoder_mask is None else merged([s.encoder_mask for s in states], 1, False))

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """hidden [rows, d] -> logits [rows, columns] (every token, or a restricted variant's), a fresh buffer the
        caller may overwrite."""
        return self._head(hidden).numpy()

    def log_probs(self, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """hidden [rows, d] -> log_softmax of the logits [rows, columns]: the logits go from the head to onnxruntime's
        LogSoftmax without a copy, which writes into `out` when it is a float32 C-contiguous array of that shape (beam
        search passes the previous step's, done with: no [rows, vocab] array made and copied per step), else into a
        fresh array.

        On a CPU where denormals are slow (slow_denormals()), a row whose logits are wide (most of them more than 87
        below its maximum, where exp's result is a denormal: random weights, or a very peaked distribution) is done
        by numpy with exp's argument floored (generation.EXP_FLOOR) instead: 28.8 against 11.9 ms for 32 such rows
        of 250112 on the Intel Xeon guest. The head then writes into `out` and each row is normalised in place. The
        choice is made per row, from that row alone, so a request's scores do not depend on its batch-mates."""
        if self.device == "cpu" and slow_denormals():
            return self._log_probs_by_row(hidden, out)
        logits = self._head(hidden)
        if out is None or out.shape != tuple(logits.shape()) or out.dtype != np.float32 or not out.flags.c_contiguous:
            out = np.empty(logits.shape(), np.float32)
        _run(self._own(log_softmax_model), "cpu", {}, {"logits": logits}, [], [],
             {"log_probs": ort.OrtValue.ortvalue_from_numpy(out)})
        return out

    def _log_probs_by_row(self, hidden: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        rows = hidden.shape[0]
        if (out is None or out.ndim != 2 or out.shape[0] != rows or out.shape[1] != self._columns
                or out.dtype != np.float32 or not out.flags.c_contiguous):
            out = self._head(hidden).numpy()
            self._columns = out.shape[1]
        else:
            _run(self.sessions["head"], "cpu", {"hidden": hidden}, {}, [], [],
                 {"logits": ort.OrtValue.ortvalue_from_numpy(out)})
        maxima = row_maxima(out, self.threads)
        wide = np.flatnonzero(wide_rows(out, maxima))
        start = 0
        for stop in [*wide, rows]:  # each run of narrow rows: onnxruntime's LogSoftmax, in place
            if stop > start:
                value = ort.OrtValue.ortvalue_from_numpy(out[start:stop])
                _run(self._own(log_softmax_model), "cpu", {}, {"logits": value}, [], [], {"log_probs": value})
            start = stop + 1
        host_map(lambda row: log_softmax_block(out[row:row + 1], maxima[row:row + 1]), list(wide), self.threads)
        return out

    def top_k(self, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest of each row of scores [rows, columns] float32, largest first, ties in column order ->
        (values, column indices), [rows, k] each (beam search's candidates): generation.sampled_top_k where this
        machine runs it faster than onnxruntime's TopK (sampled_top_k_faster), else the TopK; the same answer."""
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        if scores.size >= SAMPLED_TOP_K_MIN and sampled_top_k_faster(scores, k, self.threads, self._own(top_k_model)):
            found = sampled_top_k(scores, k, self.threads)
            if found is not None:
                return found
        values, indices = _run(self._own(top_k_model), "cpu", {"scores": scores, "k": np.array([k], np.int64)}, {}, [],
                               ["values", "indices"])
        return values.numpy(), indices.numpy()

    def _head(self, hidden: np.ndarray) -> ort.OrtValue:
        return _run(self.sessions["head"], self.device, {"hidden": hidden}, {}, [], ["logits"])[0]

    def _own(self, model) -> ort.InferenceSession:
        """The session of one of the runtime's own one-node models (session.py), made on first use with the model's
        threads (set after the runner)."""
        if model not in self._own_sessions:
            self._own_sessions[model] = small_session(model(), self.threads, self.policy)
        return self._own_sessions[model]

    @property
    def has_screen(self) -> bool:
        return "screen" in self.sessions

    def screen(self, hidden: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """hidden [rows, d] -> candidate ids [rows, K], their exact logits [rows, K], and a bound [rows] on
        every other logit (K = candidates, at most vocab - 1)."""
        outputs = _run(self.sessions["screen"], self.device,
                       {"hidden": hidden, "candidates": np.array([candidates], np.int64)}, {}, [],
                       ["candidate_ids", "candidate_logits", "rest_bound"])
        return tuple(value.numpy() for value in outputs)

    cross_names: list[str] = []


class Seq2SeqRunner(Runner):
    """mT0: the encoder runs once per request and yields the cross-attention keys/values."""

    def __init__(self, manifest: Manifest, sessions: dict[str, ort.InferenceSession], device: str,
                 shared_cache: bool = False):
        super().__init__(manifest, sessions, device, shared_cache)
        cross = manifest.data["cross_cache"]
        self.cross_names = [n for i in range(cross["num_layers"]) for n in (cross["key"].format(layer=i),
                                                                            cross["value"].format(layer=i))]
        self.decoder_start_token_id = manifest.tokens["decoder_start_token_id"]

    def begin(self, input_ids: np.ndarray, attention_mask: np.ndarray, expand: int, new_tokens: int = 0) -> DecodeState:
        """encode: input_ids [batch, source] (right padded) -> cross keys/values for [batch*expand] rows.
        new_tokens: the most tokens the request generates (sizes the cache; 0: unknown)."""
        outputs = _run(self.sessions["encoder"], "cpu", {"input_ids": input_ids, "attention_mask": attention_mask},
                       {}, [], self.cross_names)
        cross = []
        for value in outputs:
            array = value.numpy()  # [batch, heads, source, d]
            if expand > 1:  # once per request: every beam / sample attends to the same source
                array = np.repeat(array, expand, axis=0)
            cross.append(ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
        rows = input_ids.shape[0] * expand
        return DecodeState(input_ids=input_ids, attention_mask=np.zeros((rows, 0), np.int64), expand=expand,
                           past=self._empty_past(rows), cross=cross,
                           encoder_mask=np.repeat(attention_mask, expand, axis=0),
                           capacity=1 + new_tokens if new_tokens else 0)  # the start token, then the tokens

    def prefill(self, state: DecodeState) -> np.ndarray:
        """The decoder start token for every row -> hidden [rows, d]."""
        rows = state.encoder_mask.shape[0]
        return self.decode_step(state, np.full(rows, self.decoder_start_token_id, np.int64),
                                np.arange(rows, dtype=np.int64))

    def decode_step(self, state: DecodeState, tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        """tokens [rows], beam_idx [rows] (which row's cache each row continues) -> hidden [rows, d]"""
        rows = tokens.shape[0]
        self._attend_new(state, rows)
        feeds = {"input_ids": tokens.reshape(-1, 1), "attention_mask": state.attention_mask,
                 "encoder_attention_mask": state.encoder_mask}
        return self._decode(state, feeds, beam_idx)

    def history(self, state: DecodeState) -> np.ndarray:
        """What transformers calls input_ids for the logits processors: the decoder start token."""
        return np.full((state.encoder_mask.shape[0], 1), self.decoder_start_token_id, np.int64)


class DecoderRunner(Runner):
    """BLOOMZ: the prompt is prefilled once per prompt; beams and samples branch from it in the graph."""

    def begin(self, input_ids: np.ndarray, attention_mask: np.ndarray, expand: int, new_tokens: int = 0) -> DecodeState:
        return DecodeState(input_ids=input_ids, attention_mask=attention_mask, expand=expand,
                           past=self._empty_past(input_ids.shape[0]),
                           capacity=input_ids.shape[1] + new_tokens if new_tokens else 0)

    def prefill(self, state: DecodeState) -> np.ndarray:
        """prompt [batch, prompt] (left padded) -> hidden [batch*expand, d]"""
        batch = state.input_ids.shape[0]
        hidden = self._decode(state, {"input_ids": state.input_ids, "attention_mask": state.attention_mask},
                              np.arange(batch, dtype=np.int64))
        state.attention_mask = np.repeat(state.attention_mask, state.expand, axis=0)
        return np.repeat(hidden, state.expand, axis=0) if state.expand > 1 else hidden

    def decode_step(self, state: DecodeState, tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        """tokens [rows], beam_idx [rows] -> hidden [rows, d]"""
        branching = state.expand > 1 and state.past[0].shape()[0] != tokens.shape[0]
        if branching:  # the cache still holds one row per prompt: row r of the expanded batch branches from r // expand
            beam_idx = beam_idx // state.expand
        rows = tokens.shape[0]
        self._attend_new(state, rows)
        feeds = {"input_ids": tokens.reshape(-1, 1), "attention_mask": state.attention_mask}
        hidden = self._decode(state, feeds, beam_idx)
        if branching:
            state.common = state.input_ids.shape[1]  # every row now holds its prompt's cache
        return hidden

    def history(self, state: DecodeState) -> np.ndarray:
        """transformers' input_ids for the logits processors: the padded prompt, one row per beam/sample."""
        return np.repeat(state.input_ids, state.expand, axis=0)


RUNNERS = {"seq2seq": Seq2SeqRunner, "decoder": DecoderRunner}
