"""Continuous batching: greedy rows that join and leave one running batch between decode steps.

Text-generation-inference's shape without paged attention: each new prompt is prefilled alone (exactly as
generate() prefills it), its cache is padded and concatenated to the running batch's, and finished or cancelled
rows are filtered out, so a short request never waits for a long one. A row's attention is unchanged by the
padding: padded positions are masked, and BLOOM's ALiBi and mT5's relative position bias depend on distances.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .errors import GenerationInputError
from .generation import StepTimer, greedy_tokens

# prompt tokens a server prefills between two decode steps (at least one request's): a burst of arrivals joins over
# a few steps instead of stalling every running row for all their prefills at once (TGI's max_batch_prefill_tokens)
DEFAULT_PREFILL_TOKENS = 256


class ContinuousBatch:
    """Rows decoding together, each with its own prompt, length and minimum length; greedy only.

    admit() prefills new prompts and returns their first tokens; step() advances every row by one token;
    keep() drops rows. Rows are tagged by the caller (`owners`), in order."""

    def __init__(self, model, **options: Any):
        config = model._config(dict(options, max_new_tokens=1))
        if config.do_sample or config.num_beams > 1 or config.repetition_penalty != 1.0 or \
                config.no_repeat_ngram_size > 0 or config.output_scores:
            raise GenerationInputError("continuous batching runs greedy decoding without history-dependent "
                                       "processors (repetition penalty, no-repeat n-grams) or scores")
        self.model, self.runner = model, model.runner
        self.config = dataclasses.replace(config, min_new_tokens=0)
        self.eos_suppressed = dataclasses.replace(config, min_new_tokens=1)  # with generated=0: no eos yet
        self.state = None
        self.next_tokens = np.zeros(0, np.int64)  # [rows] what each row feeds at the next step
        self.generated = np.zeros(0, np.int64)  # [rows]
        self.min_tokens = np.zeros(0, np.int64)  # [rows]
        self.owners: list[Any] = []
        self.timer = StepTimer()

    @property
    def rows(self) -> int:
        return len(self.owners)

    def admit(self, prompts: Sequence[Sequence[int]], owners: Sequence[Any], min_tokens: Sequence[int]) -> np.ndarray:
        """Prefill each prompt (token ids) alone, exactly as generate() prefills it, and join them to the batch
        -> their first tokens."""
        states, hidden = [], []
        for prompt in self.model._check_ids(list(prompts)):
            ids, mask = self.model._batch([prompt], self.config.pad_token_id)
            state = self.runner.begin(ids, mask, 1, 0)  # no request-sized buffers: the batch's cache is re-laid out
            hidden.append(self.runner.prefill(state))  # [1, d]
            states.append(state)
        minimum = np.asarray(min_tokens, np.int64)
        tokens = self._select(np.concatenate(hidden), np.zeros(len(owners), np.int64), minimum)
        self.state = self.runner.join(self.state, states)
        self.next_tokens = np.concatenate([self.next_tokens, tokens])
        self.generated = np.concatenate([self.generated, np.ones(len(owners), np.int64)])
        self.min_tokens = np.concatenate([self.min_tokens, minimum])
        self.owners += list(owners)
        return tokens

    def step(self) -> np.ndarray:
        """One decoder run for every row -> the next token of each row [rows]."""
        hidden = self.runner.decode_step(self.state, self.next_tokens, np.arange(self.rows, dtype=np.int64))
        tokens = self._select(hidden, self.generated, self.min_tokens)
        self.next_tokens, self.generated = tokens, self.generated + 1
        return tokens

    def keep(self, keep: np.ndarray) -> None:
        """Keep the rows where keep [rows] is true (the others finished or were cancelled); rows may change
        places (owners says which is which)."""
        rows = np.flatnonzero(keep)
        if rows.size == self.rows:
            return
        if not rows.size:
            self.state, self.owners = None, []
            self.next_tokens, self.generated, self.min_tokens = (np.zeros(0, np.int64),) * 3
            return
        order = self.runner.keep(self.state, rows)
        self.owners = [self.owners[i] for i in order]
        self.next_tokens, self.generated, self.min_tokens = (self.next_tokens[order], self.generated[order],
                                                             self.min_tokens[order])

    def _select(self, hidden: np.ndarray, generated: np.ndarray, min_tokens: np.ndarray) -> np.ndarray:
        """Greedy tokens (through the greedy screen where the variant has one); eos barred from rows still under
        their minimum length, as min_new_tokens does."""
        tokens = np.empty(hidden.shape[0], np.int64)
        history = np.zeros((hidden.shape[0], 0), np.int64)  # no processor here reads it
        early = generated < min_tokens
        for rows, config in ((np.flatnonzero(early), self.eos_suppressed), (np.flatnonzero(~early), self.config)):
            if rows.size:
                tokens[rows] = greedy_tokens(self.runner, hidden[rows], history[rows], 0, config, self.timer)
        return tokens
