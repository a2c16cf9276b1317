"""Token selection with transformers' semantics: logits processors, greedy / sampling, beam search.

Each function mirrors its transformers counterpart (generation/utils.py, logits_process.py) closely
enough that greedy and beam outputs are token-for-token equal on the same logits.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import InferenceError

NEG_INF = -np.inf
BEAM_FILL = -1.0e9  # transformers' "impossible" beam score


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    min_new_tokens: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    stop_strings: tuple[str, ...]
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    no_repeat_ngram_size: int
    repetition_penalty: float
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    output_scores: bool


@dataclass(frozen=True)
class Vocabulary:
    """A restricted head's columns: logit column c is token ids[c]. The ids ascend, so the lowest column among equal
    logits is the lowest token id (transformers' tie-break) and beam candidates keep their order."""

    ids: np.ndarray  # [columns] int64, ascending

    def tokens(self, columns: np.ndarray) -> np.ndarray:
        return self.ids[columns]

    def columns(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the column of each token, whether the head has it) for tokens of any shape."""
        position = np.minimum(np.searchsorted(self.ids, tokens), len(self.ids) - 1)
        return position, self.ids[position] == tokens


def token_ids(vocabulary: Vocabulary | None, columns: np.ndarray) -> np.ndarray:
    """Token ids of logit columns (the identity for a full head)."""
    return columns if vocabulary is None else vocabulary.tokens(columns)


def _present(vocabulary: Vocabulary | None, tokens) -> np.ndarray:
    """The columns of those tokens the head has (all of them for a full head)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if vocabulary is None:
        return tokens
    columns, found = vocabulary.columns(tokens)
    return columns[found]


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float
    token_scores: list[float] | None = None


@dataclass
class StepTimer:
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    screened_rows: int = 0  # greedy rows whose token the screen certified
    full_rows: int = 0  # rows whose step ran the full head (no screen, scores asked for, sampling, or not certified)

    def record(self, step: int, seconds: float) -> None:
        """Step 0 is the prefill (time to the first token); the others are per-token steps."""
        if step == 0:
            self.prefill_seconds = seconds
        else:
            self.step_seconds.append(seconds)


# ---- logits processors: scores [rows, columns], history [rows, length] -> scores (in place) ----
# History and eos are token ids; a restricted head's columns are the tokens of its Vocabulary (None: all tokens).

def penalized(scores: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty on the scores of tokens already seen (lower them when penalty > 1)."""
    return np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))


def apply_repetition_penalty(scores: np.ndarray, history: np.ndarray, penalty: float,
                             vocabulary: Vocabulary | None = None) -> None:
    rows = np.broadcast_to(np.arange(scores.shape[0])[:, None], history.shape)
    columns, found = (history, slice(None)) if vocabulary is None else vocabulary.columns(history)
    rows, columns = rows[found], columns[found]
    scores[rows, columns] = penalized(scores[rows, columns], penalty)


def banned_ngram_tokens(history: np.ndarray, size: int) -> list[list[int]]:
    """For each row, the tokens that would repeat an n-gram already in its history."""
    banned = []
    length = history.shape[1]
    for row in history.tolist():
        if length + 1 < size:
            banned.append([])
            continue
        prefix = tuple(row[length + 1 - size:])
        banned.append([row[i + size - 1] for i in range(length - size + 1) if tuple(row[i:i + size - 1]) == prefix])
    return banned


def apply_no_repeat_ngram(scores: np.ndarray, history: np.ndarray, size: int,
                          vocabulary: Vocabulary | None = None) -> None:
    for row, tokens in enumerate(banned_ngram_tokens(history, size)):
        if tokens:
            scores[row, _present(vocabulary, tokens)] = NEG_INF


def apply_min_new_tokens(scores: np.ndarray, generated: int, config: GenerationConfig,
                         vocabulary: Vocabulary | None = None) -> None:
    if generated < config.min_new_tokens and config.eos_token_id:
        scores[:, _present(vocabulary, config.eos_token_id)] = NEG_INF


def process(scores: np.ndarray, history: np.ndarray, generated: int, config: GenerationConfig,
            vocabulary: Vocabulary | None = None) -> np.ndarray:
    """transformers' processor order: repetition penalty, no-repeat n-gram, min new tokens."""
    if config.repetition_penalty != 1.0:
        apply_repetition_penalty(scores, history, config.repetition_penalty, vocabulary)
    if config.no_repeat_ngram_size > 0:
        apply_no_repeat_ngram(scores, history, config.no_repeat_ngram_size, vocabulary)
    apply_min_new_tokens(scores, generated, config, vocabulary)
    return scores


def process_candidates(scores: np.ndarray, ids: np.ndarray, history: np.ndarray, generated: int,
                       config: GenerationConfig) -> np.ndarray:
    """process() on a few columns: scores [rows, k] are the logits of tokens ids [rows, k] (in place)."""
    if config.repetition_penalty != 1.0:
        seen = (ids[:, :, None] == history[:, None, :]).any(axis=2)  # [rows, k]
        scores[seen] = penalized(scores[seen], config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        for row, tokens in enumerate(banned_ngram_tokens(history, config.no_repeat_ngram_size)):
            if tokens:
                scores[row, np.isin(ids[row], tokens)] = NEG_INF
    if generated < config.min_new_tokens and config.eos_token_id:
        scores[np.isin(ids, config.eos_token_id)] = NEG_INF
    return scores


def screened(config: GenerationConfig) -> bool:
    """Can the greedy screen pick this configuration's tokens exactly? Its bound holds for processors that only
    lower logits (a repetition penalty below 1 raises some), and log-probabilities need every logit."""
    return not config.do_sample and not config.output_scores and config.repetition_penalty >= 1.0


def greedy_tokens(runner, hidden: np.ndarray, history: np.ndarray, generated: int, config: GenerationConfig,
                  timer: StepTimer) -> np.ndarray:
    """argmax of the processed logits, through the screen where it certifies the row, else the full head."""
    rows = hidden.shape[0]
    tokens = np.empty(rows, np.int64)
    uncertain = np.arange(rows)
    if runner.has_screen:
        columns, exact, rest = runner.screen(hidden, runner.screen_candidates)
        ids = token_ids(runner.vocabulary, columns)
        exact = process_candidates(exact, ids, history, generated, config)
        best = exact.max(axis=1)
        # transformers' argmax takes the first of equal maxima: the lowest id among the candidates that tie
        tokens[:] = np.where(exact == best[:, None], ids, np.iinfo(np.int64).max).min(axis=1)
        uncertain = np.flatnonzero(~(best > rest))  # NaN never certifies
        timer.screened_rows += rows - uncertain.size
    if uncertain.size:
        timer.full_rows += uncertain.size
        scores = process(runner.logits(hidden[uncertain]), history[uncertain], generated, config, runner.vocabulary)
        tokens[uncertain] = token_ids(runner.vocabulary, np.argmax(scores, axis=-1))
    return tokens


def warp(scores: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """Sampling warpers in transformers' order: temperature, top-k, top-p."""
    if config.temperature != 1.0:
        scores = scores / np.float32(config.temperature)
    if config.top_k > 0:
        k = min(config.top_k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
        scores = np.where(scores < kth, NEG_INF, scores)
    if config.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
        remove_sorted = cumulative <= (1 - config.top_p)
        remove_sorted[:, -1] = False  # keep at least one token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores = np.where(remove, NEG_INF, scores)
    return scores


# exp's argument is floored here: e^-87 = 1.6e-38 is still a normal float32 (the smallest is 1.18e-38), so the sum
# never meets a denormal, which some CPUs compute in microcode (9x slower on the Intel Xeon guest), and the terms it
# raises add at most vocab x 1.6e-38 to a sum of at least 1: nothing in float32.
EXP_FLOOR = np.float32(-87.0)
TOP_K_SAMPLE = 4096  # columns of each row a sampled top-k looks at to set its threshold
# probability mass left to the exact sort on either side of top-p's boundary, when top-p looks at a whole row
TOP_P_MARGIN = 1e-4


def sample_threshold(scores: np.ndarray, k: int) -> np.ndarray | None:
    """[rows, columns] -> per row, the k-th largest of an evenly spaced sample of TOP_K_SAMPLE columns [rows]: at
    most the row's k-th largest, so the columns at or above it (about k x columns / TOP_K_SAMPLE) hold the row's
    best k, ties included. None when the sample is no longer than k. NaN sorts last: a NaN row's threshold is NaN."""
    sample = scores[:, ::max(1, scores.shape[1] // TOP_K_SAMPLE)]
    return np.partition(sample, sample.shape[1] - k, axis=1)[:, sample.shape[1] - k] if sample.shape[1] > k else None


def _kth_largest(row: np.ndarray, k: int) -> np.float32:
    """The k-th largest of row [columns] (finite maximum), partitioning only the columns at or above the sample's
    threshold (sample_threshold) rather than the whole row."""
    threshold = sample_threshold(row[None], k)
    above = row if threshold is None else row[row >= threshold[0]]
    return np.partition(above, above.size - k)[above.size - k]


def sampling_distribution(row: np.ndarray, config: GenerationConfig) -> tuple[np.ndarray | None, np.ndarray]:
    """What sampling draws from, for one row of processed scores [columns] float32: transformers' temperature, top-k
    and top-p warpers, then softmax -> (the columns left, ascending, or None for every column; their probabilities,
    float64, summing to 1).

    The same columns and probabilities as softmax(warp(row)) (`warp` below, which the tests hold to transformers),
    without sorting or exponentiating the whole row: top-k keeps the columns at or above the k-th largest (ties
    kept); top-p sorts only the columns that can sit at its boundary — those top-k left, or, on a whole row, those
    whose probability is at least (1 - top_p - TOP_P_MARGIN) / columns, since all the others together hold at most
    1 - top_p - TOP_P_MARGIN and fall below it. Its weights floor exp's argument (EXP_FLOOR): a weight that small
    is never near the boundary. mt0-small int8, 8 rows of 250112 on the Intel Xeon guest: a sampled step took 66 ms
    with top_k=50 and 377 ms with top_p=0.9 when the whole row was warped, sorted and drawn from (greedy: 20 ms)."""
    x = row / np.float32(config.temperature) if config.temperature != 1.0 else row
    maximum = x.max()
    if not np.isfinite(maximum):
        raise InferenceError("the model's scores for a row are NaN, infinite or all -inf after the logits processors; "
                             "sampling cannot draw from them. With a quantized or fp16 variant, try the fp32 one.")
    columns = None
    if 0 < config.top_k < x.size:
        columns = np.flatnonzero(x >= _kth_largest(x, config.top_k))
    values = x if columns is None else x[columns]
    if config.top_p < 1.0:
        weights = np.exp(np.maximum(values - maximum, EXP_FLOOR))  # float32, as transformers' softmax
        total = weights.sum(dtype=np.float64)
        candidates = np.arange(values.size)
        if columns is None:  # the whole row: only the columns above a probability floor can reach the boundary
            candidates = np.flatnonzero(weights >= (1.0 - config.top_p - TOP_P_MARGIN) / values.size * total)
        order = candidates[np.argsort(values[candidates], kind="stable")]  # ascending, ties in column order
        cumulative = (total - weights[order].sum(dtype=np.float64) + np.cumsum(weights[order], dtype=np.float64)) / total
        remove = cumulative <= 1.0 - config.top_p
        remove[-1] = False  # keep at least one token
        kept = np.sort(order[~remove])
        columns, values = (kept if columns is None else columns[kept]), values[kept]
    probabilities = np.exp(values.astype(np.float64) - np.float64(maximum))
    return columns, probabilities / probabilities.sum()


def draw(probabilities: np.ndarray, rng: np.random.Generator) -> int:
    """rng.choice(probabilities.size, p=probabilities), one uniform from rng mapped through the cumulative sum as
    numpy's Generator.choice maps it (the same draw for the same rng state), without its checks of p."""
    cdf = np.cumsum(probabilities)
    cdf /= cdf[-1]
    return int(np.searchsorted(cdf, rng.random(), side="right"))


def sample_columns(scores: np.ndarray, config: GenerationConfig, rng: np.random.Generator,
                   with_log_probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One draw per row of processed scores [rows, columns] (sampling_distribution), rows in order from rng ->
    (columns [rows], their log-probabilities under the warped distribution [rows] when asked, else None)."""
    rows = scores.shape[0]
    columns = np.empty(rows, np.int64)
    log_probs = np.empty(rows, np.float32) if with_log_probs else None
    for row in range(rows):
        kept, probabilities = sampling_distribution(scores[row], config)
        drawn = draw(probabilities, rng)
        columns[row] = drawn if kept is None else kept[drawn]
        if with_log_probs:  # log_softmax of the warped row: its other columns are -inf
            log_probs[row] = np.log(probabilities[drawn])
    return columns, log_probs


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def log_softmax_block(block: np.ndarray, maximum: np.ndarray | None = None) -> None:
    """log_softmax over the last axis of block [chunk, vocab] (a view), written over it; maximum: its rows' maxima
    [chunk, 1] when the caller has them."""
    block -= block.max(axis=-1, keepdims=True) if maximum is None else maximum
    block -= np.log(np.exp(np.maximum(block, EXP_FLOOR)).sum(axis=-1, keepdims=True))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def host_map(function: Callable, items: list, threads: int | None = None) -> None:
    """function(item) for every item, on `threads` host threads (None: one per core) when there are several: for
    numpy work that releases the GIL (ufuncs, copies), each item large enough to be worth a thread."""
    threads = threads or os.cpu_count() or 1
    if len(items) < 2 or threads < 2:
        for item in items:
            function(item)
        return
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="xmtf-host")
    list(_POOLS[threads].map(function, items))


def log_softmax_inplace(scores: np.ndarray, rows_per_chunk: int = 4, threads: int | None = None) -> np.ndarray:
    """log_softmax of a float32 [rows, vocab] array, written over it.

    Rows are done a few at a time so that the exp temporary stays small, and the chunks of a large array go to
    `threads` threads (the model's; None: one per core; numpy's ufuncs release the GIL): at 8x4 beams over 250k
    tokens this was a third of mt0-small's step, single-threaded."""
    chunks = [scores[start:start + rows_per_chunk] for start in range(0, scores.shape[0], rows_per_chunk)]
    host_map(log_softmax_block, chunks, threads if scores.size >= 1 << 20 else 1)
    return scores


def beam_candidates(log_probs: np.ndarray, running_scores: np.ndarray, keep: int,
                    top_k) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` best (beam, token) continuations per batch item, best first, as transformers' top-k over
    log_probs + running score flattened to [batch, beams*vocab] (ties: lower flat index first).

    Never materialises [batch, beams*vocab]: every entry of an item's best `keep` is among the best `keep` of its
    own row, so only those are ranked. top_k(array, k) -> values, indices: per row, largest first, ties in index
    order (the runner's onnxruntime TopK). log_probs [batch*beams, vocab], running_scores [batch, beams] -> flat
    indices and scores, [batch, keep].
    """
    rows, vocab = log_probs.shape
    batch, beams = running_scores.shape
    per_row = min(keep, vocab)
    values, token = top_k(log_probs, per_row)  # [rows, per_row]
    if np.isnan(values).any():
        raise InferenceError("the model produced NaN logits; beam search cannot rank them. With a quantized or fp16 "
                             "variant, try the fp32 one.")
    total = (values + running_scores.reshape(rows, 1)).reshape(batch, beams * per_row)  # the dense form's sum
    index = ((np.arange(rows) % beams)[:, None] * vocab + token).reshape(batch, beams * per_row)
    picked = np.lexsort((index, -total))[:, :keep]  # per item: score descending, then index
    return np.take_along_axis(index, picked, axis=1), np.take_along_axis(total, picked, axis=1)


def sampled_top_k(scores: np.ndarray, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The k largest of each row of scores [rows, columns] float32, largest first, ties in column order, as
    onnxruntime's TopK -> (values, column indices), [rows, k] each; None when the sample meets a NaN (a row of NaN
    log-probs: the caller ranks it another way, and reports it) or a row is no longer than k.

    Exact: only the columns at or above each row's sample_threshold are sorted. Rows in blocks of 4 on `threads`
    host threads (numpy's compare and nonzero release the GIL)."""
    rows, columns = scores.shape
    k = min(k, columns)
    threshold = sample_threshold(scores, k)
    if threshold is None or np.isnan(threshold).any():
        return None
    values = np.empty((rows, k), np.float32)
    indices = np.empty((rows, k), np.int64)
    failed = []

    def four_rows(start: int) -> None:
        block = scores[start:start + 4]
        flat = np.flatnonzero(block >= threshold[start:start + 4, None])
        row, column = np.divmod(flat, columns)
        value = block.reshape(-1)[flat]
        order = np.lexsort((column, -value, row))  # by row, then value descending, then column
        first = np.searchsorted(row[order], np.arange(block.shape[0]))
        counts = np.diff(np.append(first, flat.size))
        if (counts < k).any():  # only a NaN the sample missed makes a row short
            failed.append(start)
            return
        picked = order[first[:, None] + np.arange(k)]
        values[start:start + 4], indices[start:start + 4] = value[picked], column[picked]
    host_map(four_rows, list(range(0, rows, 4)), threads if scores.size >= 1 << 20 else 1)
    return None if failed else (values, indices)


def topk_sorted(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first. values [rows, n] -> [rows, k]"""
    if k >= values.shape[1]:
        return np.argsort(-values, axis=1, kind="stable")
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(values, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


# ---- greedy and sampling ----

def sample_tokens(runner, state, config: GenerationConfig, stop_check: Callable | None,
                  timer: StepTimer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Greedy or multinomial decoding; yields (tokens [rows], running before this step [rows], log-probs or None).

    Finished rows keep producing pad_token_id, as in transformers, and are not reported as running.
    """
    rng = np.random.default_rng(config.seed)
    history = runner.history(state)  # [rows, length]
    rows = history.shape[0]
    running = np.ones(rows, dtype=bool)
    eos = np.array(config.eos_token_id, dtype=np.int64)
    began = time.perf_counter()
    hidden = runner.prefill(state)  # [rows, d]
    lean = screened(config)
    for generated in range(config.max_new_tokens):
        token_scores = None
        if lean:
            tokens = greedy_tokens(runner, hidden, history, generated, config, timer)
        else:
            timer.full_rows += rows
            scores = process(runner.logits(hidden), history, generated, config, runner.vocabulary)  # its own buffer
            if config.do_sample:
                columns, token_scores = sample_columns(scores, config, rng, config.output_scores)
            else:
                columns = np.argmax(scores, axis=-1).astype(np.int64)
            tokens = token_ids(runner.vocabulary, columns)
        timer.record(generated, time.perf_counter() - began)  # a step: the model's calls and the choice
        # log-probabilities over the head's tokens (a restricted head: over the allowed set; sampling: the warped ones)
        if config.output_scores and not config.do_sample:
            token_scores = np.take_along_axis(log_softmax_inplace(scores, threads=runner.threads), columns[:, None],
                                              axis=1)[:, 0]
        tokens = np.where(running, tokens, config.pad_token_id)
        history = np.concatenate([history, tokens[:, None]], axis=1)
        was_running = running.copy()
        running &= ~np.isin(tokens, eos)
        if stop_check is not None:
            running &= ~stop_check(history, generated + 1)
        yield tokens, was_running, token_scores
        if not running.any() or generated + 1 == config.max_new_tokens:
            return
        began = time.perf_counter()
        hidden = runner.decode_step(state, tokens, np.arange(rows, dtype=np.int64))


def run_sampling(runner, state, config: GenerationConfig, stop_check, timer: StepTimer) -> list[Hypothesis]:
    rows = runner.history(state).shape[0]
    hypotheses = [Hypothesis([], 0.0, [] if config.output_scores else None) for _ in range(rows)]
    for tokens, running, token_scores in sample_tokens(runner, state, config, stop_check, timer):
        for row in np.flatnonzero(running):
            hypothesis = hypotheses[row]
            hypothesis.tokens.append(int(tokens[row]))
            if token_scores is not None:
                hypothesis.score += float(token_scores[row])
                hypothesis.token_scores.append(float(token_scores[row]))
    return hypotheses


# ---- beam search (transformers' vectorised _beam_search) ----

def run_beam_search(runner, state, config: GenerationConfig, stop_check, timer: StepTimer) -> list[Hypothesis]:
    rng = np.random.default_rng(config.seed)
    num_beams = config.num_beams
    prompt = runner.history(state)  # [batch*beams, prompt_length]
    rows, prompt_length = prompt.shape
    batch = rows // num_beams
    max_length = prompt_length + config.max_new_tokens
    eos = np.array(config.eos_token_id, dtype=np.int64)
    beams_to_keep = max(2, 1 + len(eos)) * num_beams
    top_num_beam_mask = np.arange(beams_to_keep) < num_beams
    steps = config.max_new_tokens

    running_sequences = np.full((batch, num_beams, max_length), config.pad_token_id, np.int64)
    running_sequences[:, :, :prompt_length] = prompt.reshape(batch, num_beams, prompt_length)
    running_token_scores = np.zeros((batch, num_beams, steps), np.float32)
    running_scores = np.zeros((batch, num_beams), np.float32)
    running_scores[:, 1:] = BEAM_FILL
    sequences = running_sequences.copy()
    token_scores_done = running_token_scores.copy()
    lengths = np.zeros((batch, num_beams), np.int64)  # generated length of each finished hypothesis
    beam_scores = np.full((batch, num_beams), BEAM_FILL, np.float32)
    finished = np.zeros((batch, num_beams), dtype=bool)
    improvable = np.ones((batch, 1), dtype=bool)
    batch_offset = (np.arange(batch) * num_beams)[:, None]

    began = time.perf_counter()
    log_probs = runner.log_probs(runner.prefill(state))  # [rows, vocab]
    cur_len = prompt_length
    while True:
        history = running_sequences[:, :, :cur_len].reshape(rows, cur_len)
        timer.full_rows += rows
        log_probs = process(log_probs, history, cur_len - prompt_length, config, runner.vocabulary)
        vocab = log_probs.shape[-1]
        if config.do_sample:
            log_probs = warp(log_probs, config)
            accumulated = (log_probs.reshape(batch, num_beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)
            probabilities = softmax(accumulated.astype(np.float64))
            candidates = np.stack([rng.choice(accumulated.shape[1], size=beams_to_keep, replace=False, p=p)
                                   for p in probabilities])  # [batch, keep]
            topk_log_probs = np.take_along_axis(accumulated, candidates, axis=1)
        else:
            candidates, topk_log_probs = beam_candidates(log_probs, running_scores, beams_to_keep,  # [batch, keep]
                                                         runner.top_k)
        source_beam, topk_columns = candidates // vocab, candidates % vocab
        topk_ids = token_ids(runner.vocabulary, topk_columns)
        timer.record(cur_len - prompt_length, time.perf_counter() - began)  # the model's calls and the ranking
        topk_sequences = np.take_along_axis(running_sequences, source_beam[:, :, None], axis=1)
        topk_sequences[:, :, cur_len] = topk_ids
        topk_token_scores = np.take_along_axis(running_token_scores, source_beam[:, :, None], axis=1)
        topk_token_scores[:, :, cur_len - prompt_length] = log_probs[source_beam + batch_offset, topk_columns]

        hits = np.isin(topk_ids, eos) | (cur_len + 1 >= max_length)
        if stop_check is not None:
            flat = topk_sequences[:, :, prompt_length:cur_len + 1].reshape(batch * beams_to_keep, -1)
            hits |= stop_check(flat, cur_len + 1 - prompt_length).reshape(batch, beams_to_keep)

        # Beams that go on: the best num_beams candidates that did not just stop.
        running_candidates = topk_log_probs + hits.astype(np.float32) * BEAM_FILL
        keep = topk_sorted(running_candidates, num_beams)
        running_sequences = np.take_along_axis(topk_sequences, keep[:, :, None], axis=1)
        running_token_scores = np.take_along_axis(topk_token_scores, keep[:, :, None], axis=1)
        running_scores = np.take_along_axis(running_candidates, keep, axis=1)
        beam_idx = (np.take_along_axis(source_beam, keep, axis=1) + batch_offset).reshape(-1)

        # Finished hypotheses: merge the ones that just stopped with those kept so far.
        just_finished = hits & top_num_beam_mask[None, :]
        final_scores = topk_log_probs / np.float32((cur_len + 1 - prompt_length) ** config.length_penalty)
        all_done = finished.all(axis=-1, keepdims=True) & (config.early_stopping is True)
        final_scores = final_scores + all_done * np.float32(BEAM_FILL)
        final_scores = final_scores + (~improvable) * np.float32(BEAM_FILL)
        final_scores = final_scores + (~just_finished) * np.float32(BEAM_FILL)
        merged_scores = np.concatenate([beam_scores, final_scores], axis=1)
        best = topk_sorted(merged_scores, num_beams)
        sequences = np.take_along_axis(np.concatenate([sequences, topk_sequences], axis=1), best[:, :, None], axis=1)
        token_scores_done = np.take_along_axis(np.concatenate([token_scores_done, topk_token_scores], axis=1),
                                               best[:, :, None], axis=1)
        new_lengths = np.full((batch, beams_to_keep), cur_len + 1 - prompt_length, np.int64)
        lengths = np.take_along_axis(np.concatenate([lengths, new_lengths], axis=1), best, axis=1)
        beam_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished = np.take_along_axis(np.concatenate([finished, just_finished], axis=1), best, axis=1)

        cur_len += 1
        if config.early_stopping == "never" and config.length_penalty > 0.0:
            best_length = max_length - prompt_length
        else:
            best_length = cur_len - prompt_length
        best_possible = running_scores[:, :1] / np.float32(best_length ** config.length_penalty)
        worst_finished = np.where(finished, beam_scores.min(axis=1, keepdims=True), np.float32(BEAM_FILL))
        improvable = improvable & np.any(best_possible > worst_finished, axis=-1, keepdims=True)
        open_beam = not (finished.all() and config.early_stopping is True)
        if not (improvable.any() and open_beam and not hits.all()):
            break
        began = time.perf_counter()
        hidden = runner.decode_step(state, running_sequences[:, :, cur_len - 1].reshape(-1), beam_idx)
        log_probs = runner.log_probs(hidden, out=log_probs)  # this step's scores were read: their buffer is reused

    returned = config.num_return_sequences
    hypotheses = []
    for b in range(batch):
        for k in range(returned):
            length = int(lengths[b, k])
            tokens = sequences[b, k, prompt_length:prompt_length + length].tolist()
            token_scores = token_scores_done[b, k, :length].tolist() if config.output_scores else None
            hypotheses.append(Hypothesis(tokens, float(beam_scores[b, k]), token_scores))
    return hypotheses
