"""load(folder) -> Model: generate / stream over an exported mT0 or BLOOMZ folder."""

from __future__ import annotations

import dataclasses
import numbers
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from .errors import GenerationInputError, ManifestError
from .generation import (GenerationConfig, Hypothesis, StepTimer, Vocabulary, run_beam_search,
                         run_sampling, sample_tokens)
from .manifest import OPTIONAL_ROLES, ROLES, SHARED_DECODER, Manifest, read_manifest
from .runners import RUNNERS
from .session import DEFAULT_POLICY, advise_random_access, make_session, page_out_weights, resolve_provider
from .tuning import machine_policy

OPTION_NAMES = ("max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id", "stop_strings", "num_beams",
                "length_penalty", "early_stopping", "num_return_sequences", "no_repeat_ngram_size",
                "repetition_penalty", "do_sample", "temperature", "top_k", "top_p", "seed", "output_scores")
LIBRARY_DEFAULTS = {"max_new_tokens": 20, "min_new_tokens": 0, "stop_strings": (), "num_beams": 1,
                    "length_penalty": 1.0, "early_stopping": False, "num_return_sequences": 1,
                    "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "do_sample": False, "temperature": 1.0,
                    "top_k": 50, "top_p": 1.0, "seed": None, "output_scores": False}


@dataclass
class GenerationOutput:
    """Returned sequences in input order, then num_return_sequences per input."""

    sequences: list[list[int]]  # generated ids only: no prompt, no start token, no padding; eos kept
    scores: list[float] | None  # beam score (length-penalised), or the summed log-probability when output_scores
    token_scores: list[list[float]] | None = None  # per generated token log-probability (output_scores)
    metrics: dict[str, Any] = field(default_factory=dict)  # prefill and per-step seconds
    decode: Callable[[Sequence[int]], str] | None = field(default=None, repr=False, compare=False)
    _texts: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def texts(self) -> list[str] | None:
        """The sequences as text, decoded on first read (a caller of ids only never loads the tokenizer); None
        when the export has no tokenizer."""
        if self._texts is None and self.decode is not None:
            self._texts = [self.decode(s) for s in self.sequences]
        return self._texts


class Model:
    def __init__(self, manifest: Manifest, provider: str = "cpu", threads: int | None = None,
                 variant: str | None = None, session_options: ort.SessionOptions | None = None,
                 verify: bool = True, greedy_screen: bool = True, prepacked_cache: str | os.PathLike | None = None,
                 shared_cache: bool = True):
        self.manifest = manifest
        self.kind = manifest.kind
        self.provider = resolve_provider(provider)
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        variant = manifest.variant_name(manifest.default_variant if variant is None else variant)
        self.variant = variant
        entry = manifest.variant(variant)
        manifest.verify_files(variant, check_hashes=verify)
        missing = [role for role in ROLES[self.kind] if role not in entry["files"]]
        if missing:
            raise ManifestError(f"variant {variant!r} of {manifest.folder} has no {', '.join(missing)} graph; "
                                "export the model again.")
        on_cpu = self.provider == "CPUExecutionProvider"
        # The decoder's shared-buffer form where the export has one, on the CPU (the provider it was written for)
        shared = shared_cache and on_cpu and SHARED_DECODER in entry["files"]
        self.shared_cache = shared
        optional = [role for role in OPTIONAL_ROLES if role in entry["files"] and role != SHARED_DECODER
                    and (greedy_screen or role != "screen")]
        roles = [*ROLES[self.kind], *optional]
        files = {role: SHARED_DECODER if shared and role == "decoder" else role for role in roles}
        # How the CPU sessions' threads spin, and how many there are when `threads` is None: measured once per
        # machine (tuning.py); caller-made session options and GPU sessions keep the built-in default.
        self.thread_policy = machine_policy() if session_options is None and on_cpu else DEFAULT_POLICY
        weight_files = [manifest.path(item["path"]) for file in entry["files"].values() for item in file.get("data", [])]
        own_options = session_options is None and on_cpu  # the weights onnxruntime packs: see the two functions
        self.sessions = {}
        for role in roles:
            self.sessions[role] = make_session(manifest.path(entry["files"][files[role]]["path"]), provider, threads,
                                               session_options, prepacked_cache, self.thread_policy)
            if own_options:
                page_out_weights(weight_files)
        self._files = files
        if own_options:
            advise_random_access(weight_files)
        self._check_io()
        self.runner = RUNNERS[self.kind](manifest, self.sessions, self.device, shared_cache=shared)
        self.runner.threads = threads  # the host-side work (log-softmax over beams) uses as many threads
        self.runner.policy = self.thread_policy
        self.tokens = manifest.tokens
        self.vocab_size = int(self.tokens["vocab_size"])
        self.restricted = entry.get("restricted")  # None, or what `xmtf-onnx restrict` recorded (base, rows, coverage)
        if self.restricted:
            self.runner.vocabulary = _restricted_vocabulary(manifest, entry, self.vocab_size)
            self.runner.screen_candidates = min(self.runner.screen_candidates, len(self.runner.vocabulary.ids) - 1)
        self._text = _Text.of(manifest)
        self.defaults = dict(LIBRARY_DEFAULTS)
        self.defaults.update({k: v for k, v in manifest.data.get("generation_defaults", {}).items()
                              if k in LIBRARY_DEFAULTS})
        self._batch_variance: list[str | None] = []  # batch_variance's answer, once measured

    @property
    def has_tokenizer(self) -> bool:
        return self._text is not None

    @property
    def tokenizer(self):
        """The export's `tokenizers.Tokenizer`, read on first use (see _Text); None when the export has none."""
        return None if self._text is None else self._text.tokenizer

    def _check_io(self) -> None:
        """The manifest's IO and cache shape against what each session really has; lists every mismatch."""
        problems = []
        cache = self.manifest.cache
        for role, session in self.sessions.items():
            expected = self.manifest.data["io"].get(self._files[role], {})
            inputs = {i.name: i for i in session.get_inputs()}
            outputs = {o.name for o in session.get_outputs()}
            problems += [f"{role} lacks input {n}" for n in expected.get("inputs", []) if n not in inputs]
            problems += [f"{role} lacks output {n}" for n in expected.get("outputs", []) if n not in outputs]
            if role == "decoder":
                for layer in range(cache["num_layers"]):
                    name = cache["past_key"].format(layer=layer)
                    if name not in inputs:
                        problems.append(f"decoder lacks cache input {name}")
                        continue
                    shape = inputs[name].shape
                    if shape[1] != cache["num_heads"] or shape[3] != cache["head_dim"]:
                        problems.append(f"{name} has shape {shape}, the manifest says heads={cache['num_heads']} "
                                        f"head_dim={cache['head_dim']}")
        if problems:
            raise ManifestError(f"{self.manifest.folder} does not match its manifest: " + "; ".join(problems)
                                + ". Export the model again.")

    # ---- inputs ----

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        if not self.has_tokenizer:
            raise GenerationInputError(
                f"{self.manifest.folder} has no tokenizer.json (its checkpoint had none): "
                "pass token ids with input_ids=[[...], ...] instead of text."
            )
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise GenerationInputError(f"prompt {index} is {type(prompt).__name__}, not str")
            if not prompt:
                raise GenerationInputError(f"prompt {index} is empty; give it some text")
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(prompts))]

    def _check_ids(self, input_ids) -> list[list[int]]:
        if isinstance(input_ids, np.ndarray):
            input_ids = input_ids.tolist()
        if not isinstance(input_ids, (list, tuple)) or not input_ids:
            raise GenerationInputError("input_ids must be a non-empty list of token id lists")
        if all(isinstance(i, numbers.Integral) for i in input_ids):
            input_ids = [input_ids]  # one prompt given flat
        checked = []
        for index, row in enumerate(input_ids):
            if not isinstance(row, (list, tuple)) or not row:
                raise GenerationInputError(f"input_ids[{index}] must be a non-empty list of token ids, not {row!r}")
            for token in row:
                if not isinstance(token, numbers.Integral) or isinstance(token, bool):
                    raise GenerationInputError(f"input_ids[{index}] holds {token!r}, which is not an integer id")
                if not 0 <= token < self.vocab_size:
                    raise GenerationInputError(
                        f"input_ids[{index}] holds {token}, outside the vocabulary [0, {self.vocab_size})")
            checked.append([int(t) for t in row])
        return checked

    def _batch(self, rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Pad to one length: left for the decoder kind (generation continues at the right), right for seq2seq."""
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), pad, np.int64)  # [batch, length]
        mask = np.zeros((len(rows), length), np.int64)
        for i, row in enumerate(rows):
            if self.kind == "decoder":
                ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
            else:
                ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return ids, mask

    def _config(self, options: dict[str, Any]) -> GenerationConfig:
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise GenerationInputError(f"unknown generation option(s) {', '.join(unknown)}; "
                                       f"known: {', '.join(OPTION_NAMES)}")
        values = dict(self.defaults)
        values.update({k: v for k, v in options.items() if v is not None})
        return _validated_config(values, self.tokens, self.vocab_size, self.has_tokenizer)

    # ---- generation ----

    def generate(self, prompts: str | Sequence[str] | None = None, *, input_ids=None,
                 **options) -> GenerationOutput:
        """Generate for each prompt (text) or each list of token ids; options use Hugging Face's names."""
        rows = self._inputs(prompts, input_ids)
        config = self._config(options)
        if config.max_new_tokens == 0:
            count = len(rows) * config.num_return_sequences
            return GenerationOutput([[] for _ in range(count)], [0.0] * count if _scored(config) else None,
                                    [[] for _ in range(count)] if config.output_scores else None,
                                    decode=self._text and self._text.decode)
        expand = config.num_beams if config.num_beams > 1 else config.num_return_sequences
        ids, mask = self._batch(rows, config.pad_token_id)
        state = self.runner.begin(ids, mask, expand, config.max_new_tokens)
        timer = StepTimer()
        stop_check = self._stop_check(config)
        if config.num_beams > 1:
            hypotheses = run_beam_search(self.runner, state, config, stop_check, timer)
        else:
            hypotheses = run_sampling(self.runner, state, config, stop_check, timer)
        return self._output(hypotheses, config, timer)

    @property
    def batch_invariant(self) -> bool:
        """Does a row's result not depend on the other rows of its batch (how many, and which)? See batch_variance."""
        return self.batch_variance is None

    @property
    def batch_variance(self) -> str | None:
        """Why a row's numbers can differ between a batch and generate() of it alone on this machine, or None when
        they do not. int8-dynamic quantizes a batch's activations with one scale: always. Other variants are
        measured here, once per model (a prefill, a decode step and the head, for one row alone and beside
        another, compared bit for bit): onnxruntime's kernels may take another path for one row than for several
        (the Intel Xeon guest's 8-bit MatMulNBits does, its 4-bit and fp32 MatMul do not; on the AMD EPYC none did).
        The server batches only when this is None."""
        if not self._batch_variance:
            quantization = self.manifest.variant(self.variant).get("quantization") or {}
            if quantization.get("method") == "dynamic":
                reason = "it quantizes a whole batch's activations with one scale"
            else:
                reason = None if self._rows_alone_equal_rows_batched() else \
                    "onnxruntime computes one row by another path than several on this machine"
            self._batch_variance.append(reason)
        return self._batch_variance[0]

    def _rows_alone_equal_rows_batched(self) -> bool:
        """One prompt alone, beside another of its length, and among five: the same prefill hidden state, decode
        step and logits, bit for bit."""
        top = self.vocab_size - 1
        prompts = [[1 + ((2 * k + 7) * i + 3 + k) % top for i in range(6)] for k in range(5)]
        pad = self.tokens.get("pad_token_id") or 0
        outputs = []
        for rows in (prompts[:1], prompts[:2], prompts):
            ids, mask = self._batch(rows, pad)
            state = self.runner.begin(ids, mask, 1, 2)
            hidden = self.runner.prefill(state)
            step = self.runner.decode_step(state, np.full(len(rows), prompts[0][0], np.int64), np.arange(len(rows)))
            outputs.append((hidden[0], step[0], self.runner.logits(step)[0]))
        return all(np.array_equal(a, b) for batched in outputs[1:] for a, b in zip(outputs[0], batched))

    def continuous_batch(self, padded: bool = False, **options):
        """A ContinuousBatch (runtime/batching.py): greedy rows that join and leave between decode steps; the
        options are generate()'s, shared by its rows (min_new_tokens is per row, given at admit). padded: rows
        padded into one decoder run (faster; tokens can differ from generate() alone at near-ties)."""
        from .batching import ContinuousBatch

        return ContinuousBatch(self, padded=padded, **options)

    def check_options(self, **options) -> None:
        """Raise GenerationInputError if generate() would refuse these options (names and values)."""
        self._config(options)

    def steps(self, input_ids, **options) -> Iterator[tuple[list[int], list[bool], list[float] | None]]:
        """Greedy or sampling over a batch of token id prompts, one step at a time, for callers that follow several
        requests at once (the server): each step yields (the token of every row, whether each row was still running
        before this step, their log-probabilities when output_scores). Rows are the prompts in order, then
        num_return_sequences per prompt; a finished row yields pad_token_id. Closing the iterator stops the work."""
        rows = self._check_ids(input_ids)
        config = self._config(options)
        if config.num_beams > 1:
            raise GenerationInputError("steps() runs greedy or sampling; beam search returns at the end: generate()")
        if config.max_new_tokens == 0:
            return
        ids, mask = self._batch(rows, config.pad_token_id)
        state = self.runner.begin(ids, mask, config.num_return_sequences, config.max_new_tokens)
        for tokens, running, scores in sample_tokens(self.runner, state, config, self._stop_check(config),
                                                     StepTimer()):
            yield tokens.tolist(), running.tolist(), None if scores is None else scores.tolist()

    def stream_tokens(self, prompt: str | Sequence[int] | None = None, *, input_ids: Sequence[int] | None = None,
                      **options) -> Iterator[int]:
        """The generated token ids of one prompt (text, or token ids) as they are produced; greedy or sampling
        (beam search yields its best sequence at the end). Works on exports without a tokenizer."""
        if input_ids is None and prompt is not None and not isinstance(prompt, str):
            prompt, input_ids = None, prompt
        if isinstance(input_ids, (list, tuple, np.ndarray)) and any(not isinstance(t, numbers.Integral)
                                                                   for t in input_ids):
            raise GenerationInputError("streaming takes one prompt (a list of token ids), not a batch; "
                                       "use generate() for several prompts")
        rows = self._inputs(None if prompt is None else [prompt], None if input_ids is None else [input_ids])
        config = self._config(options)
        if config.num_beams > 1 or config.num_return_sequences > 1 or config.max_new_tokens == 0:
            yield from self.generate(input_ids=rows, **options).sequences[0]
            return
        config = dataclasses.replace(config, output_scores=False)  # ids only: greedy may take the screen
        ids, mask = self._batch(rows, config.pad_token_id)
        state = self.runner.begin(ids, mask, 1, config.max_new_tokens)
        for step_tokens, running, _ in sample_tokens(self.runner, state, config, self._stop_check(config),
                                                     StepTimer()):
            if not running[0]:
                return
            yield int(step_tokens[0])

    def stream(self, prompt: str | Sequence[int] | None = None, *, input_ids: Sequence[int] | None = None,
               **options) -> Iterator[str]:
        """Text pieces as they are produced, for one prompt (text or token ids); see stream_tokens()."""
        if not self.has_tokenizer:
            raise GenerationInputError("stream() yields text and this export has no tokenizer; "
                                       "use stream_tokens() for the token ids.")
        tokens: list[int] = []
        emitted = ""
        for token in self.stream_tokens(prompt, input_ids=input_ids, **options):
            tokens.append(token)
            text = self.decode(tokens)
            # Hold back a trailing partial character (byte-level BPE splits UTF-8 sequences).
            if text.startswith(emitted) and not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        text = self.decode(tokens)
        if text != emitted and text.startswith(emitted):
            yield text[len(emitted):]

    def teacher_forced(self, input_ids, targets) -> Iterator[np.ndarray]:
        """Next-token log-probabilities along given continuations (teacher forcing), one step at a time.

        input_ids: prompts as token id lists; targets: one continuation per prompt (token ids, no decoder start
        token). Step t yields log p(. | prompt_i, targets_i[:t]) for every row -> [batch, vocab]; rows whose
        target is shorter than t + 1 hold the continuation padded with pad_token_id (ignore them).
        Scoring candidate answers and the benchmark's fidelity report use it.
        """
        rows, targets = self._check_ids(input_ids), self._check_ids(targets)
        if len(rows) != len(targets):
            raise GenerationInputError(f"{len(rows)} prompts but {len(targets)} targets; give one target per prompt")
        pad = self._config({}).pad_token_id
        steps = max(len(t) for t in targets)
        forced = np.full((len(rows), steps), pad, np.int64)  # [batch, steps]
        for i, target in enumerate(targets):
            forced[i, :len(target)] = target
        ids, mask = self._batch(rows, pad)
        state = self.runner.begin(ids, mask, 1, steps)
        hidden = self.runner.prefill(state)  # [batch, d]
        vocabulary = self.runner.vocabulary
        for step in range(steps):
            log_probs = self.runner.log_probs(hidden)  # [batch, columns]
            if vocabulary is not None:  # every token: those the restricted head cannot produce are -inf
                full = np.full((log_probs.shape[0], self.vocab_size), -np.inf, np.float32)
                full[:, vocabulary.ids] = log_probs
                log_probs = full
            yield log_probs  # [batch, vocab]
            if step + 1 < steps:
                hidden = self.runner.decode_step(state, forced[:, step], np.arange(len(rows), dtype=np.int64))

    def decode(self, tokens: Sequence[int]) -> str:
        """transformers' decode(tokens, skip_special_tokens=True) for this export's tokenizer."""
        if self._text is None:
            raise GenerationInputError(f"{self.manifest.folder} has no tokenizer.json: there is no text to decode to")
        return self._text.decode(tokens)

    def _inputs(self, prompts, input_ids) -> list[list[int]]:
        if (prompts is None) == (input_ids is None):
            raise GenerationInputError("pass either prompts (text) or input_ids (token ids), not both or neither")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts:
                raise GenerationInputError("the prompt list is empty; pass at least one prompt")
            return self._check_ids(self._encode_prompts(prompts))
        return self._check_ids(input_ids)

    def _stop_check(self, config: GenerationConfig):
        if not config.stop_strings:
            return None

        def check(generated: np.ndarray, count: int) -> np.ndarray:
            """generated [rows, >= count]: does each row's text now contain a stop string?"""
            texts = [self.decode(row[-count:]) for row in generated.tolist()]
            return np.array([any(s in t for s in config.stop_strings) for t in texts], dtype=bool)

        return check

    def _output(self, hypotheses: list[Hypothesis], config: GenerationConfig, timer: StepTimer) -> GenerationOutput:
        sequences = [h.tokens for h in hypotheses]
        token_scores = [h.token_scores for h in hypotheses] if config.output_scores else None
        scores = [h.score for h in hypotheses] if _scored(config) else None
        metrics = {"prefill_seconds": timer.prefill_seconds, "step_seconds": timer.step_seconds,
                   "screened_rows": timer.screened_rows, "full_rows": timer.full_rows}
        return GenerationOutput(sequences, scores, token_scores, metrics, self._text and self._text.decode)


def _scored(config: GenerationConfig) -> bool:
    """Beam search always ranks by its scores; greedy and sampling compute them only when asked (as transformers)."""
    return config.num_beams > 1 or config.output_scores


def _validated_config(values: dict[str, Any], tokens: dict[str, Any], vocab_size: int,
                      has_tokenizer: bool) -> GenerationConfig:
    def integer(name: str, low: int) -> int:
        value = values[name]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise GenerationInputError(f"{name} must be an integer >= {low}, not {value!r}")
        return int(value)

    def number(name: str) -> float:
        value = values[name]
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not np.isfinite(value):
            raise GenerationInputError(f"{name} must be a finite number, not {value!r}")
        return float(value)

    eos = values.get("eos_token_id", tokens.get("eos_token_id"))
    eos = [] if eos is None else ([eos] if isinstance(eos, numbers.Integral) else list(eos))
    for token in eos:
        if not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
            raise GenerationInputError(f"eos_token_id {token!r} is not a token id in [0, {vocab_size})")
    pad = values.get("pad_token_id", tokens.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if eos else 0
    if not isinstance(pad, numbers.Integral) or not 0 <= pad < vocab_size:
        raise GenerationInputError(f"pad_token_id {pad!r} is not a token id in [0, {vocab_size})")
    num_beams = integer("num_beams", 1)
    returned = integer("num_return_sequences", 1)
    do_sample = values["do_sample"]
    if not isinstance(do_sample, bool):
        raise GenerationInputError(f"do_sample must be True or False, not {do_sample!r}")
    if num_beams > 1 and returned > num_beams:
        raise GenerationInputError(f"num_return_sequences ({returned}) cannot exceed num_beams ({num_beams})")
    if num_beams == 1 and not do_sample and returned > 1:
        raise GenerationInputError(f"num_return_sequences={returned} needs num_beams >= {returned} or do_sample=True")
    temperature = number("temperature")
    if do_sample and temperature <= 0:
        raise GenerationInputError(f"temperature must be > 0 when sampling, not {temperature}")
    top_p = number("top_p")
    if not 0 < top_p <= 1:
        raise GenerationInputError(f"top_p must be in (0, 1], not {top_p}")
    repetition_penalty = number("repetition_penalty")
    if repetition_penalty <= 0:
        raise GenerationInputError(f"repetition_penalty must be > 0, not {repetition_penalty}")
    early_stopping = values["early_stopping"]
    if early_stopping not in (True, False, "never"):
        raise GenerationInputError(f"early_stopping must be True, False or 'never', not {early_stopping!r}")
    stop_strings = values["stop_strings"]
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
    if stop_strings and not has_tokenizer:
        raise GenerationInputError("stop_strings need a tokenizer and this export has none")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise GenerationInputError(f"stop_strings must be non-empty strings, not {stop_strings!r}")
    seed = values["seed"]
    if seed is not None and (not isinstance(seed, numbers.Integral) or seed < 0):
        raise GenerationInputError(f"seed must be a non-negative integer, not {seed!r}")
    return GenerationConfig(
        max_new_tokens=integer("max_new_tokens", 0), min_new_tokens=integer("min_new_tokens", 0),
        eos_token_id=tuple(int(t) for t in eos), pad_token_id=int(pad), stop_strings=stop_strings,
        num_beams=num_beams, length_penalty=number("length_penalty"), early_stopping=early_stopping,
        num_return_sequences=returned, no_repeat_ngram_size=integer("no_repeat_ngram_size", 0),
        repetition_penalty=repetition_penalty, do_sample=do_sample, temperature=temperature,
        top_k=integer("top_k", 0), top_p=top_p, seed=seed, output_scores=bool(values["output_scores"]),
    )


def _restricted_vocabulary(manifest: Manifest, entry: dict, vocab_size: int) -> Vocabulary:
    """The token ids of a restricted variant's logit columns (its `vocabulary` file, int64, ascending)."""
    path = manifest.path(entry["files"]["vocabulary"]["path"])
    ids = np.fromfile(path, dtype="<i8")
    if ids.size < 2 or (np.diff(ids) <= 0).any() or ids[0] < 0 or ids[-1] >= vocab_size:
        raise ManifestError(f"{path} is not an ascending list of token ids in [0, {vocab_size}); "
                            "make the variant again with `xmtf-onnx restrict`.")
    return Vocabulary(ids.astype(np.int64))


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class _Text:
    """The export's tokenizer, read on first use: a 250k-piece vocabulary takes ~110 MB and a second to build,
    which a caller of token ids never needs. Outputs decode their texts through this object, not the model, so an
    output kept does not keep the model's sessions alive."""

    def __init__(self, path: str, clean_up: bool):
        self.path, self.clean_up = path, clean_up
        self._tokenizer = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, manifest: Manifest) -> "_Text | None":
        """The export's tokenizer (its file checked to exist now, read on first use), or None when it has none."""
        entry = manifest.data.get("tokenizer")
        if not entry:
            return None
        path = manifest.path(entry["file"])
        if not os.path.isfile(path):
            raise ManifestError(f"{manifest.folder} is incomplete: its manifest names {entry['file']}, which is "
                                "missing. Export it again (xmtf-onnx export MODEL OUTPUT --force).")
        return cls(path, bool(entry.get("clean_up_tokenization_spaces")))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    from tokenizers import Tokenizer

                    try:
                        self._tokenizer = Tokenizer.from_file(self.path)
                    except Exception as e:
                        raise ManifestError(f"{self.path} cannot be read by tokenizers ({e}); export the model "
                                            "again.") from e
        return self._tokenizer

    def decode(self, tokens: Sequence[int]) -> str:
        """transformers' decode(tokens, skip_special_tokens=True)."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return _clean_up_tokenization(text) if self.clean_up else text


def load(folder: str | os.PathLike, provider: str = "cpu", threads: int | None = None, variant: str | None = None,
         session_options: ort.SessionOptions | None = None, verify: bool = True,
         greedy_screen: bool = True, prepacked_cache: str | os.PathLike | None = None,
         shared_cache: bool = True) -> Model:
    """Load an exported folder. provider: 'cpu' or 'cuda'; threads: intra-op threads (None: the machine's thread
    policy, measured on the first load on a machine and cached: see xmtf_onnx.runtime.tuning); variant: a variant
    the folder holds (None: the manifest's default_variant, fp32 when the folder has it); verify: check every
    file's sha256;
    greedy_screen: pick greedy tokens through the screen where the variant has one (exact; off: always the
    full logits, for comparison); prepacked_cache: a folder where onnxruntime's packed CPU weights are saved on
    the first load and memory-mapped on the next ones, instead of packed into a heap copy of the weights (no
    second copy in RssAnon, shared by processes, faster loads; costs about the variant's size on disk);
    shared_cache: on the CPU, run the decoder's shared-buffer form where the export has one (one cache buffer per
    layer that the graph writes each step into; off: the portable form, which copies the cache every step, as on
    CUDA)."""
    return Model(read_manifest(folder), provider, threads, variant, session_options, verify, greedy_screen,
                 prepacked_cache, shared_cache)
