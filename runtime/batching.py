"""Continuous batching: greedy and sampled rows that join and leave one running batch between decode steps.

Text-generation-inference's shape without paged attention, kept exact: each new prompt is prefilled alone (as
generate() prefills it) and finished or cancelled rows are filtered out, so a short request never waits for a
long one. Rows are held in cohorts whose caches have one length (rows that joined together with prompts of one
length, or whose lengths met): each step runs the decoder once per cohort, unpadded, and the output projection
and token choice once for every row. Padding rows to one length would batch the decoder too, but onnxruntime's
CPU kernels group a sum's terms by position, so a padded row rounds differently and a near-tie of a greedy
step can flip (measured: 6% of requests on mt0-small); unpadded, a row's numbers are those of generate() alone.
The output projection, most of a step's bytes for these 250k-token vocabularies, is batched across all rows. A
sampled request's rows share its warpers and seeded generator, from which they draw in generate()'s row order each
step (a row that finished burning its uniform), so they too get generate()'s tokens whatever shares their batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .errors import GenerationInputError, InferenceError
from .generation import GenerationConfig, StepTimer, apply_min_new_tokens, greedy_tokens, sample_columns, token_ids

# prompt tokens a server prefills between two decode steps (at least one request's): a burst of arrivals joins over
# a few steps instead of stalling every running row for all their prefills at once (TGI's max_batch_prefill_tokens)
DEFAULT_PREFILL_TOKENS = 256
# how a server batches: exact (rows never padded, every answer equals generate() alone) or padded (faster)
BATCHING = ("exact", "padded")
# generate() options a row may hold alone in a batch: how it samples (the others are the batch's)
SAMPLING_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "seed")


@dataclasses.dataclass
class Sampler:
    """A sampled request's warpers and seeded generator, shared by its rows (its prompts, each num_return_sequences
    times, admitted together in generate()'s row order). generate() alone draws one uniform per row per step, in
    row order, finished rows included, until every row has finished; the batch does the same, a row that left
    burning its uniform, so every row gets generate()'s tokens."""

    config: GenerationConfig
    rng: np.random.Generator
    rows: int = 0  # rows admitted with it; a row's place among them is its order of admission

    def draw_order(self, present: dict[int, int]) -> list[int | None]:
        """present: a row's place in the request -> its row in the step. -> the step's rows in the request's row
        order, None for each row that has left (its uniform is burnt)."""
        return [present.get(place) for place in range(self.rows)]


@dataclasses.dataclass
class Cohort:
    """Rows whose caches have one length, decoded by one decoder run."""

    state: Any  # the runner's DecodeState
    owners: list[Any]
    next_tokens: np.ndarray  # [rows] what each row feeds at the next step
    generated: np.ndarray  # [rows]
    min_tokens: np.ndarray  # [rows]
    samplers: list[tuple[Sampler, int] | None]  # [rows] the request's sampler and the row's place in it; None: greedy

    def take(self, rows: np.ndarray) -> None:
        self.owners = [self.owners[i] for i in rows]
        self.samplers = [self.samplers[i] for i in rows]
        self.next_tokens, self.generated, self.min_tokens = (self.next_tokens[rows], self.generated[rows],
                                                             self.min_tokens[rows])


class ContinuousBatch:
    """Rows decoding together, each with its own prompt, length and minimum length, greedy or sampled (each sampled
    row with its own temperature, top-k, top-p and seeded generator: sampler()).

    admit() prefills new prompts and returns their first tokens; step() advances every row by one token;
    keep() drops rows. Rows are tagged by the caller (`owners`, in row order: read it after admit and keep)."""

    def __init__(self, model, padded: bool = False, **options: Any):
        """padded: one cohort, rows padded to its lengths (text-generation-inference's batch): the decoder runs
        once per step for every row, faster, but a row's tokens can differ from generate() alone at near-ties."""
        config = model._config(dict(options, max_new_tokens=1))
        if config.do_sample or config.num_beams > 1 or config.repetition_penalty != 1.0 or \
                config.no_repeat_ngram_size > 0 or config.output_scores:
            raise GenerationInputError("continuous batching runs greedy decoding without history-dependent "
                                       "processors (repetition penalty, no-repeat n-grams) or scores; a sampled "
                                       "row brings its own sampler()")
        self.model, self.runner = model, model.runner
        self.options = options
        self.config = dataclasses.replace(config, min_new_tokens=0)
        self.eos_suppressed = dataclasses.replace(config, min_new_tokens=1)  # with generated=0: no eos yet
        self.cohorts: list[Cohort] = []
        self.padded = padded
        self.timer = StepTimer()
        # the owners of rows whose request's draw failed in the latest admit() or step() (a row of NaN scores), with
        # why: their tokens are meaningless; the caller drops them (keep) and answers their requests with the error
        self.failures: list[tuple[Any, str]] = []

    def sampler(self, **sampling: Any) -> Sampler | None:
        """A request's sampler from its SAMPLING_OPTIONS over the batch's options (None: its rows are greedy); give
        it to admit() for each of the request's rows, in generate()'s row order, in one call."""
        unknown = sorted(set(sampling) - set(SAMPLING_OPTIONS))
        if unknown:
            raise GenerationInputError(f"a row of a continuous batch sets only {', '.join(SAMPLING_OPTIONS)}, "
                                       f"not {', '.join(unknown)}")
        config = self.model._config(dict(self.options, **sampling, max_new_tokens=1))
        return Sampler(config, np.random.default_rng(config.seed)) if config.do_sample else None

    @property
    def owners(self) -> list[Any]:
        return [owner for cohort in self.cohorts for owner in cohort.owners]

    @property
    def rows(self) -> int:
        return sum(len(cohort.owners) for cohort in self.cohorts)

    def admit(self, prompts: Sequence[Sequence[int]], owners: Sequence[Any], min_tokens: Sequence[int],
              samplers: Sequence[Sampler | None] | None = None) -> np.ndarray:
        """Prefill each prompt (token ids) alone, exactly as generate() prefills it, and add it to the batch
        -> their first tokens, in the order given. samplers: each row's request's sampler() (a request's rows in its
        row order), None for a greedy row."""
        entries: list[tuple[Sampler, int] | None] = []
        for sampler in [None] * len(owners) if samplers is None else samplers:
            entries.append(None if sampler is None else (sampler, sampler.rows))
            if sampler is not None:
                sampler.rows += 1
        samplers = entries
        states, hidden = [], []
        for prompt in self.model._check_ids(list(prompts)):
            ids, mask = self.model._batch([prompt], self.config.pad_token_id)
            state = self.runner.begin(ids, mask, 1, 0)  # no request-sized buffers: cohorts join and shrink
            hidden.append(self.runner.prefill(state))  # [1, d]
            states.append(state)
        minimum = np.asarray(min_tokens, np.int64)
        tokens = self._select(np.concatenate(hidden), np.zeros(len(owners), np.int64), minimum, samplers,
                              list(owners))
        for index, state in enumerate(states):
            self.cohorts.append(Cohort(state, [owners[index]], tokens[index:index + 1], np.ones(1, np.int64),
                                       minimum[index:index + 1], [samplers[index]]))
        self._merge()
        return tokens

    def step(self) -> np.ndarray:
        """One decoder run per cohort, one output projection for every row -> the next token of each row [rows]."""
        hidden = np.concatenate([self.runner.decode_step(c.state, c.next_tokens, np.arange(len(c.owners)))
                                 for c in self.cohorts])  # [rows, d]
        generated = np.concatenate([c.generated for c in self.cohorts])
        tokens = self._select(hidden, generated, np.concatenate([c.min_tokens for c in self.cohorts]),
                              [sampler for c in self.cohorts for sampler in c.samplers], self.owners)
        start = 0
        for cohort in self.cohorts:
            end = start + len(cohort.owners)
            cohort.next_tokens, cohort.generated = tokens[start:end], cohort.generated + 1
            start = end
        self._merge()  # cohorts whose lengths now meet (BLOOM: a shorter prompt that generated more)
        return tokens

    def keep(self, keep: np.ndarray) -> None:
        """Keep the rows where keep [rows] is true (the others finished or were cancelled)."""
        start, cohorts = 0, []
        for cohort in self.cohorts:
            rows = np.flatnonzero(keep[start:start + len(cohort.owners)])
            start += len(cohort.owners)
            if rows.size == len(cohort.owners):
                cohorts.append(cohort)
            elif rows.size:
                self.runner.keep(cohort.state, rows)
                cohort.take(rows)
                cohorts.append(cohort)
        self.cohorts = cohorts

    def _merge(self) -> None:
        """Cohorts with caches of one length become one (nothing padded), in the order of their first member;
        padded: every cohort becomes one."""
        groups: dict[tuple, list[Cohort]] = {}
        for cohort in self.cohorts:
            groups.setdefault(() if self.padded else self.runner.shape_key(cohort.state), []).append(cohort)
        if len(groups) == len(self.cohorts):
            return
        merged = []
        for group in groups.values():
            if len(group) == 1:
                merged.append(group[0])
                continue
            merged.append(Cohort(self.runner.join([c.state for c in group]), [o for c in group for o in c.owners],
                                 *(np.concatenate([getattr(c, name) for c in group])
                                   for name in ("next_tokens", "generated", "min_tokens")),
                                 [sampler for c in group for sampler in c.samplers]))
        self.cohorts = merged

    def _select(self, hidden: np.ndarray, generated: np.ndarray, min_tokens: np.ndarray,
                samplers: list[tuple[Sampler, int] | None], owners: list[Any]) -> np.ndarray:
        """Greedy tokens (through the greedy screen where the variant has one), and for sampled rows a draw from
        their request's warpers and generator over the full head's logits, in the request's row order (Sampler);
        eos barred from rows still under their minimum length, as min_new_tokens does. A request whose draw fails
        (InferenceError: NaN scores) goes to self.failures, its batch-mates unaffected."""
        self.failures = []
        tokens = np.empty(hidden.shape[0], np.int64)
        history = np.zeros((hidden.shape[0], 0), np.int64)  # no processor here reads it
        early = generated < min_tokens
        sampled = np.array([sampler is not None for sampler in samplers], bool)
        for rows, config in ((np.flatnonzero(early & ~sampled), self.eos_suppressed),
                             (np.flatnonzero(~early & ~sampled), self.config)):
            if rows.size:
                tokens[rows] = greedy_tokens(self.runner, hidden[rows], history[rows], 0, config, self.timer)
        rows = np.flatnonzero(sampled)
        if rows.size:
            self.timer.full_rows += rows.size
            logits = self.runner.logits(hidden[rows])  # one projection for every sampled row; each row's own
            requests: dict[int, tuple[Sampler, dict[int, int]]] = {}
            for index, row in enumerate(rows):
                sampler, place = samplers[row]
                requests.setdefault(id(sampler), (sampler, {}))[1][place] = index
            for sampler, present in requests.values():
                try:
                    for index in sampler.draw_order(present):
                        if index is None:
                            sampler.rng.random()  # a row that left: generate() alone still draws for it
                            continue
                        row, scores = rows[index], logits[index:index + 1]
                        if early[row]:
                            apply_min_new_tokens(scores, 0, self.eos_suppressed, self.runner.vocabulary)
                        columns, _ = sample_columns(scores, sampler.config, sampler.rng)
                        tokens[row] = token_ids(self.runner.vocabulary, columns)[0]
                except InferenceError as e:
                    failed = rows[list(present.values())]
                    tokens[failed] = self.config.pad_token_id
                    self.failures += [(owners[row], str(e)) for row in failed]
        return tokens
