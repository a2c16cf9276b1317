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

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .errors import InferenceError
from .manifest import Manifest


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
    # CPU: two sets of flat buffers, one per present, holding the cache of alternate steps (ping-pong)
    buffers: list[list[np.ndarray]] | None = None
    flip: int = 0
    # continuous batching on the CPU: the caches live in arrays of `slots` rows ([slots, heads, length, d]; the
    # batch's rows are the first ones), so a row that joins or leaves moves one row, not the whole cache
    slots: int = 0
    past_arrays: list[np.ndarray] | None = None
    cross_arrays: list[np.ndarray] | None = None


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
    try:
        session.run_with_iobinding(binding)
    except Exception as e:
        raise InferenceError(f"onnxruntime failed running {session._model_path}: {e}") from e
    return binding.get_outputs()


class Runner:
    """Shared by both kinds: the cache names and the empty first-step past."""

    def __init__(self, manifest: Manifest, sessions: dict[str, ort.InferenceSession], device: str):
        self.manifest, self.sessions, self.device = manifest, sessions, device
        cache = manifest.cache
        self.num_layers, self.num_heads, self.head_dim = cache["num_layers"], cache["num_heads"], cache["head_dim"]
        self.cache_dtype = np.dtype(cache.get("dtype", "float32"))
        layers = range(self.num_layers)
        self.past_names = [n for i in layers for n in (cache["past_key"].format(layer=i),
                                                       cache["past_value"].format(layer=i))]
        self.present_names = [n for i in layers for n in (cache["present_key"].format(layer=i),
                                                          cache["present_value"].format(layer=i))]
        vocab = int(manifest.tokens["vocab_size"])
        self.vocabulary = None  # a restricted variant's Vocabulary: which token each logit column is (Model sets it)
        self.threads: int | None = None  # the model's threads (None: onnxruntime's default, one per core)
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
        values = dict(zip(self.past_names, state.past))
        values.update(zip(self.cross_names, state.cross))
        feeds["beam_idx"] = beam_idx
        rows, new = feeds["input_ids"].shape
        presents = self._presents(state, rows, state.past[0].shape()[2] + new)
        outputs = _run(self.sessions["decoder"], self.device, feeds, values, [], ["hidden"], presents)
        state.past = list(presents.values())
        return outputs[-1].numpy()

    def _presents(self, state: DecodeState, rows: int, length: int) -> dict[str, ort.OrtValue]:
        """Where this step's presents [rows, heads, length, d] go, allocated outside onnxruntime's arena.

        On the CPU they alternate between two sets of buffers sized for the whole request: the past is read
        from one while the present is written to the other, and a cache that grows by one position per step
        is never allocated again (bloomz-560m int8 at 8x4 beams: bench peak RSS 2.1-2.6 GB before, 1.9 GB
        after, of which 2 x 352 MB are the past and present held together)."""
        shape = [rows, self.num_heads, length, self.head_dim]
        size = rows * self.num_heads * length * self.head_dim
        if self.device == "cpu" and state.slots:  # a continuous batch: presents in arrays with its free slots
            state.past_arrays = [np.empty([state.slots] + shape[1:], self.cache_dtype) for _ in self.present_names]
            return {name: ort.OrtValue.ortvalue_from_numpy(array[:rows])
                    for name, array in zip(self.present_names, state.past_arrays)}
        if self.device != "cpu" or not state.capacity or length > state.capacity:
            return {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self.device, 0)
                    for name in self.present_names}
        if state.buffers is None:
            rows_max = max(rows, state.input_ids.shape[0] * state.expand)
            count = rows_max * self.num_heads * state.capacity * self.head_dim
            state.buffers = [[np.empty(count, self.cache_dtype) for _ in self.present_names] for _ in range(2)]
        state.flip ^= 1
        return {name: ort.OrtValue.ortvalue_from_numpy(buffer[:size].reshape(shape))
                for name, buffer in zip(self.present_names, state.buffers[state.flip])}

    # ---- continuous batching: rows join and leave a running batch between steps (TGI's filter / concatenate) ----

    def keep(self, state: DecodeState, rows: np.ndarray) -> np.ndarray:
        """Keep the rows `rows` (ascending) of a continuous batch's state, the others leave -> the new order (row i
        is the old row order[i]): each leaving row's slot takes a kept row from the end, one row copied per move.
        Cache positions no kept row attends (the left padding of rows that left, the cross cache's right padding)
        go once they are a quarter of the cache: a batch that never empties stays the size its rows need."""
        kept = set(rows.tolist())
        holes = [i for i in range(rows.size) if i not in kept]  # slots below the kept count whose row left
        movers = [r for r in rows.tolist() if r >= rows.size]  # kept rows beyond it
        order = np.arange(rows.size)
        order[holes] = movers
        past, cross = self._arrays(state)
        for array in past + cross:
            array[holes] = array[movers]
        state.attention_mask, state.input_ids = state.attention_mask[order], state.input_ids[order]
        mask = state.attention_mask  # [kept, total]
        start = int(np.argmax(mask.any(axis=0))) if mask.size else 0
        if 4 * start >= mask.shape[1] > 0:
            past = [np.ascontiguousarray(a[:, :, start:]) for a in past]
            state.attention_mask = mask[:, start:]
        if state.encoder_mask is not None:
            encoder = state.encoder_mask = state.encoder_mask[order]  # [kept, source]
            end = int(np.flatnonzero(encoder.any(axis=0))[-1]) + 1 if encoder.any() else 0
            if 4 * end <= 3 * encoder.shape[1]:
                cross = [np.ascontiguousarray(a[:, :, :end]) for a in cross]
                state.encoder_mask = encoder[:, :end]
        self._bind(state, past, cross, rows.size)
        return order

    def join(self, state: DecodeState | None, new: Sequence[DecodeState]) -> DecodeState:
        """A continuous batch's state (or None) with the rows of the new states (one prefilled prompt each) after
        its own: caches padded on the left to one length (masked there; ALiBi and mT5's relative bias depend on
        distances, so a row's attention is unchanged), cross caches padded on the right. The new rows are
        written into free slots; the whole cache is laid out again only when it must grow."""
        count = state.attention_mask.shape[0] if state is not None else 0
        rows = count + len(new)
        news = [self._arrays(s) for s in new]
        masks = ([state.attention_mask] if state else []) + [s.attention_mask for s in new]
        length = max(m.shape[1] for m in masks)
        sources = ([state.encoder_mask] if state else []) + [s.encoder_mask for s in new]
        source = max(m.shape[1] for m in sources) if sources[0] is not None else 0
        past, cross = self._arrays(state) if state is not None else ([], [])
        slots = state.slots if state is not None else 0
        if state is None or rows > slots or length > past[0].shape[2] or (cross and source > cross[0].shape[2]):
            slots = slots if rows <= slots else max(rows, 2 * slots, 4)
            past = [self._relaid(a[:count], slots, length, True) for a in past] or \
                [np.zeros((slots,) + a.shape[1:2] + (length,) + a.shape[3:], a.dtype) for a in news[0][0]]
            cross = [self._relaid(a[:count], slots, source, False) for a in cross] or \
                [np.zeros((slots,) + a.shape[1:2] + (source,) + a.shape[3:], a.dtype) for a in news[0][1]]
        for row, (new_past, new_cross) in enumerate(news, start=count):
            for target, value in zip(past, new_past):  # [1, heads, own length, d] -> left padded
                target[row, :, :length - value.shape[2]] = 0
                target[row, :, length - value.shape[2]:] = value[0]
            for target, value in zip(cross, new_cross):  # [1, heads, own source, d] -> right padded
                target[row, :, value.shape[2]:] = 0
                target[row, :, :value.shape[2]] = value[0]
        pad = lambda m, size, on_left: np.pad(m, [(0, 0), (size - m.shape[1], 0) if on_left else (0, size - m.shape[1])])  # noqa: E731
        prompt = max(s.input_ids.shape[1] for s in ([state] if state else []) + list(new))
        joined = DecodeState(
            input_ids=np.concatenate([pad(s.input_ids, prompt, True) for s in ([state] if state else []) + list(new)]),
            attention_mask=np.concatenate([pad(m, length, True) for m in masks]), expand=1, slots=slots,
            encoder_mask=np.concatenate([pad(m, source, False) for m in sources]) if source else None)
        self._bind(joined, past, cross, rows)
        return joined

    @staticmethod
    def _relaid(array: np.ndarray, slots: int, length: int, on_left: bool) -> np.ndarray:
        """[rows, heads, l, d] -> zeros [slots, heads, length, d] holding it on the left or right of axis 2."""
        out = np.zeros((slots, array.shape[1], length, array.shape[3]), array.dtype)
        if on_left:
            out[:array.shape[0], :, length - array.shape[2]:] = array
        else:
            out[:array.shape[0], :, :array.shape[2]] = array
        return out

    def _arrays(self, state: DecodeState) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The host arrays of the state's past and cross caches: a continuous batch's slot arrays on the CPU
        (rows beyond the batch are free slots), else copies of the OrtValues."""
        if self.device == "cpu" and state.past_arrays is not None:
            return state.past_arrays, state.cross_arrays
        return [v.numpy() for v in state.past], [v.numpy() for v in state.cross]

    def _bind(self, state: DecodeState, past: list[np.ndarray], cross: list[np.ndarray], rows: int) -> None:
        """The state's caches become the first `rows` rows of these arrays (shared on the CPU, copied elsewhere)."""
        state.past_arrays, state.cross_arrays = (past, cross) if self.device == "cpu" else (None, None)
        state.slots = past[0].shape[0] if self.device == "cpu" else 0
        state.past = [ort.OrtValue.ortvalue_from_numpy(a[:rows], self.device, 0) for a in past]
        state.cross = [ort.OrtValue.ortvalue_from_numpy(a[:rows], self.device, 0) for a in cross]
        state.buffers, state.capacity = None, 0

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """hidden [rows, d] -> logits [rows, columns] (every token, or a restricted variant's), a fresh buffer the
        caller may overwrite."""
        return _run(self.sessions["head"], self.device, {"hidden": hidden}, {}, [], ["logits"])[0].numpy()

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

    def __init__(self, manifest: Manifest, sessions: dict[str, ort.InferenceSession], device: str):
        super().__init__(manifest, sessions, device)
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
        if state.expand > 1 and state.past[0].shape()[0] != tokens.shape[0]:
            # The cache still holds one row per prompt: row r of the expanded batch branches from r // expand.
            beam_idx = beam_idx // state.expand
        rows = tokens.shape[0]
        self._attend_new(state, rows)
        feeds = {"input_ids": tokens.reshape(-1, 1), "attention_mask": state.attention_mask}
        return self._decode(state, feeds, beam_idx)

    def history(self, state: DecodeState) -> np.ndarray:
        """transformers' input_ids for the logits processors: the padded prompt, one row per beam/sample."""
        return np.repeat(state.input_ids, state.expand, axis=0)


RUNNERS = {"seq2seq": Seq2SeqRunner, "decoder": DecoderRunner}
