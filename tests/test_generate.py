"""The runtime against transformers.generate, token for token, on the tiny exported models."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from xmtf_onnx.runtime import GenerationInputError, load

from conftest import sample_prompts

SETTINGS = [
    dict(max_new_tokens=12),
    dict(max_new_tokens=12, num_beams=4),
    dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, length_penalty=0.5),
    dict(max_new_tokens=10, num_beams=4, early_stopping=True, no_repeat_ngram_size=2, repetition_penalty=1.3,
         min_new_tokens=5),
    dict(max_new_tokens=9, num_beams=2, early_stopping="never", length_penalty=2.0),
    dict(max_new_tokens=10, num_beams=4, length_penalty=-1.0),
    dict(max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2),
    dict(max_new_tokens=10, min_new_tokens=10),
]


def _reference_model(family):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if family["name"] == "mt5" else AutoModelForCausalLM
    return auto.from_pretrained(family["checkpoint"]).eval()


def transformers_generate(model, rows: list[list[int]], kind: str, eos: list[int], pad: int, **options):
    """transformers.generate on a padded batch -> (generated ids per sequence, eos kept, padding cut; scores)"""
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if kind == "decoder" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad,
                             return_dict_in_generate=True, output_scores=True, **options)
    start = length if kind == "decoder" else 1
    sequences = []
    for row in out.sequences[:, start:].tolist():
        kept = []
        for token in row:
            kept.append(token)
            if token in eos:
                break
        sequences.append(kept)
    if getattr(out, "sequences_scores", None) is not None:
        return sequences, out.sequences_scores.tolist()
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    return sequences, [float(transition[i, :len(s)].sum()) for i, s in enumerate(sequences)]


def _prompts(family, model, count=3) -> list[list[int]]:
    rows = [e.ids for e in model.tokenizer.encode_batch(sample_prompts(count))]
    return [r[:n] for r, n in zip(rows, (7, 13, 4, 9, 11)[:count])]  # different lengths: a padded batch


def _eos_ids(family, model, rows) -> list[int]:
    """Several eos ids that the random model really produces early, so sequences end at different steps."""
    greedy = model.generate(input_ids=rows, max_new_tokens=12, eos_token_id=[]).sequences
    candidates = [s[i] for s, i in zip(greedy, (4, 7, 2))]
    return sorted(set(candidates + [model.tokens["eos_token_id"][0]]))


def _case(family, options: dict):
    """The exported model, a padded batch of prompts, eos ids it really produces, and transformers' answer to
    options on them: (model, rows, eos, (sequences, scores))."""
    model = load(family["export"])
    rows = _prompts(family, model)
    eos = _eos_ids(family, model, rows)
    pad = model.tokens["pad_token_id"]
    return model, rows, eos, transformers_generate(_reference_model(family), rows, model.kind, eos, pad, **options)


@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_batched_generate_equals_transformers(family, options):
    model, rows, eos, (expected, expected_scores) = _case(family, options)
    output = model.generate(input_ids=rows, eos_token_id=eos, output_scores=True, **options)
    assert output.sequences == expected
    if set(options) <= {"max_new_tokens", "num_beams", "num_return_sequences", "length_penalty"}:
        assert any(s and s[-1] in eos for s in output.sequences), "the eos ids never ended a sequence"
    np.testing.assert_allclose(output.scores, expected_scores, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("options", SETTINGS[:3], ids=["greedy", "beams4", "beams3x2"])
def test_single_prompt_equals_transformers(family, options):
    model = load(family["export"])
    rows = _prompts(family, model, 1)
    pad = model.tokens["pad_token_id"]
    eos = model.tokens["eos_token_id"]
    expected, _ = transformers_generate(_reference_model(family), rows, model.kind, eos, pad, **options)
    assert model.generate(input_ids=rows, **options).sequences == expected


def test_text_prompts_and_decoded_texts(family):
    model = load(family["export"])
    prompts = sample_prompts(2)
    output = model.generate(prompts, max_new_tokens=6, num_beams=2)
    rows = [e.ids for e in model.tokenizer.encode_batch(prompts)]
    assert output.sequences == model.generate(input_ids=rows, max_new_tokens=6, num_beams=2).sequences
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family["checkpoint"])
    assert output.texts == [tokenizer.decode(s, skip_special_tokens=True) for s in output.sequences]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(family):
    model = load(family["export"])
    rows = _prompts(family, model)
    first = model.generate(input_ids=rows, do_sample=True, seed=7, max_new_tokens=10, top_p=0.9, temperature=0.8)
    again = model.generate(input_ids=rows, do_sample=True, seed=7, max_new_tokens=10, top_p=0.9, temperature=0.8)
    other = model.generate(input_ids=rows, do_sample=True, seed=8, max_new_tokens=10, top_k=0)
    assert first.sequences == again.sequences
    assert first.sequences != other.sequences
    greedy = model.generate(input_ids=rows, max_new_tokens=10)
    assert model.generate(input_ids=rows, do_sample=True, top_k=1, seed=3, max_new_tokens=10).sequences == \
        greedy.sequences
    several = model.generate(input_ids=rows, do_sample=True, seed=1, num_return_sequences=3, max_new_tokens=5)
    assert len(several.sequences) == 9


def test_stream_equals_generate(family):
    model = load(family["export"])
    for prompt in sample_prompts(3):
        pieces = list(model.stream(prompt, max_new_tokens=15))
        assert "".join(pieces) == model.generate(prompt, max_new_tokens=15).texts[0]
    assert "".join(model.stream(prompt, max_new_tokens=8, num_beams=2)) == \
        model.generate(prompt, max_new_tokens=8, num_beams=2).texts[0]


def test_stream_tokens_equal_generate(family):
    model = load(family["export"])
    rows = _prompts(family, model, 2)
    for row in rows:
        expected = model.generate(input_ids=[row], max_new_tokens=12).sequences[0]
        assert list(model.stream_tokens(row, max_new_tokens=12)) == expected
        assert list(model.stream_tokens(input_ids=row, max_new_tokens=12)) == expected
        assert "".join(model.stream(input_ids=row, max_new_tokens=12)) == model.decode(expected)
    with pytest.raises(GenerationInputError, match="one prompt"):
        list(model.stream_tokens(input_ids=rows, max_new_tokens=2))


def test_stop_strings_end_a_sequence(family):
    """A stop string cut from the text the model writes ends the sequence there. The prompt whose random output
    has the most text is used (a tiny tokenizer trained on little text decodes many ids to nothing)."""
    model = load(family["export"])
    written = {prompt: model.generate(prompt, max_new_tokens=24, eos_token_id=[]).texts[0]
               for prompt in sample_prompts(8)}
    prompt, full = max(written.items(), key=lambda item: len(item[1].strip()))
    text = full.strip()
    assert len(text) >= 2, f"the random model wrote no text to cut a stop string from: {written}"
    stop = text[2:5] if len(text) > 5 else text[1]
    stopped = model.generate(prompt, max_new_tokens=24, eos_token_id=[], stop_strings=[stop]).texts[0]
    # the sequence ends with the token that completes the stop string (which may run past it)
    assert stop in stopped and (len(stopped) < len(full) or stopped.endswith(stop))


def test_concurrent_generate_equals_serial(family):
    model = load(family["export"], threads=1)
    rows = _prompts(family, model)
    jobs = [dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3), dict(max_new_tokens=6, num_beams=2)] * 3
    serial = [model.generate(input_ids=rows, **job).sequences for job in jobs]
    results: list = [None] * len(jobs)

    def work(index):
        results[index] = model.generate(input_ids=rows, **jobs[index]).sequences

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == serial


def test_zero_new_tokens_and_output_scores(family):
    model = load(family["export"])
    rows = _prompts(family, model, 2)
    assert model.generate(input_ids=rows, max_new_tokens=0).sequences == [[], []]
    output = model.generate(input_ids=rows, max_new_tokens=5, num_beams=2, output_scores=True)
    assert all(len(t) == len(s) for t, s in zip(output.token_scores, output.sequences))
    assert output.metrics["prefill_seconds"] > 0


def test_scores_only_when_asked_and_the_default_takes_the_screen(family):
    """As transformers: greedy computes no scores unless output_scores=True, so it can take the greedy screen;
    beam search always returns its beam scores; full_rows counts every row that ran the full head."""
    model = load(family["export"])
    rows = _prompts(family, model, 2)
    steps = dict(max_new_tokens=5, min_new_tokens=5)
    default = model.generate(input_ids=rows, **steps)
    assert default.scores is None and default.token_scores is None
    assert default.metrics["screened_rows"] + default.metrics["full_rows"] == 2 * 5
    assert default.metrics["screened_rows"] > 0
    scored = model.generate(input_ids=rows, output_scores=True, **steps)
    assert scored.sequences == default.sequences
    assert len(scored.scores) == 2 and all(len(t) == 5 for t in scored.token_scores)
    assert scored.metrics == {**scored.metrics, "screened_rows": 0, "full_rows": 2 * 5}
    beams = model.generate(input_ids=rows, num_beams=2, **steps)
    assert len(beams.scores) == 2 and beams.token_scores is None and beams.metrics["full_rows"] > 0


@pytest.mark.parametrize("seed", range(6))
def test_beam_candidates_equal_the_dense_top_k(seed):
    """The candidate search (onnxruntime's TopK per row, as beam search runs it) equals a dense stable top-k over
    [batch, beams*vocab], ties and -inf included, and with fewer tokens than candidates to keep."""
    from xmtf_onnx.runtime.generation import beam_candidates
    from xmtf_onnx.runtime.session import small_session, top_k_model

    session = small_session(top_k_model(), 2)

    def top_k(scores, k):
        return session.run(None, {"scores": scores, "k": np.array([k], np.int64)})

    rng = np.random.default_rng(seed)
    batch, beams, vocab, keep = 3, 4, (37 + seed * 50) if seed < 4 else 5, 8
    log_probs = rng.integers(-6, 0, size=(batch * beams, vocab)).astype(np.float32)  # many ties
    log_probs[rng.random(log_probs.shape) < 0.2] = -np.inf
    running = rng.integers(-3, 0, size=(batch, beams)).astype(np.float32)
    running[:, 1:] = -1e9 if seed == 0 else running[:, 1:]  # the first step: one live beam per item
    dense = (log_probs.reshape(batch, beams, vocab) + running[:, :, None]).reshape(batch, -1)
    expected = np.stack([np.lexsort((np.arange(row.size), -row))[:keep] for row in dense])
    indices, scores = beam_candidates(log_probs, running, keep, top_k)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(dense, expected, axis=1))


@pytest.mark.parametrize("shape,k", [((5, 37), 8), ((3, 9000), 8), ((9, 20000), 3), ((2, 5000), 5000), ((4, 8), 12)])
def test_sampled_top_k_equals_onnxruntime_topk(shape, k):
    """generation.sampled_top_k, which beam search takes where it is faster: the same values and columns as
    onnxruntime's TopK (largest first, ties in column order) on rows full of ties and -inf, k up to the row's
    length and beyond, and no answer (the TopK ranks it) when a row is NaN."""
    from xmtf_onnx.runtime.generation import sampled_top_k
    from xmtf_onnx.runtime.session import small_session, top_k_model

    rng = np.random.default_rng(shape[1])
    scores = rng.integers(-6, 0, size=shape).astype(np.float32)
    scores[rng.random(shape) < 0.2] = -np.inf
    scores[0] = -np.inf
    k = min(k, shape[1])
    expected = small_session(top_k_model(), 2).run(None, {"scores": scores, "k": np.array([k], np.int64)})
    found = sampled_top_k(scores, k, threads=2)
    if shape[1] <= k:  # a sample of the row cannot be shorter than k: the caller ranks it with the TopK
        assert found is None
        return
    np.testing.assert_array_equal(found[0], expected[0])
    np.testing.assert_array_equal(found[1], expected[1])
    scores[-1] = np.nan
    assert sampled_top_k(scores, k) is None


@pytest.mark.parametrize("options", [SETTINGS[1], SETTINGS[3]], ids=["beams4", "beams4-processors"])
def test_beam_search_on_sampled_top_k_equals_transformers(family, options, monkeypatch):
    """Beam search with every step's candidates from generation.sampled_top_k equals transformers."""
    from xmtf_onnx.runtime import generation, runners

    taken = []
    monkeypatch.setattr(runners, "SAMPLED_TOP_K_MIN", 0)
    monkeypatch.setattr(runners, "_top_k", [True])
    monkeypatch.setattr(runners, "sampled_top_k", lambda *a: taken.append(1) or generation.sampled_top_k(*a))
    model, rows, eos, (expected, expected_scores) = _case(family, options)
    output = model.generate(input_ids=rows, eos_token_id=eos, output_scores=True, **options)
    assert taken, "the sampled top-k should have ranked the candidates"
    assert output.sequences == expected
    np.testing.assert_allclose(output.scores, expected_scores, atol=1e-3, rtol=1e-3)


WARPS = [dict(top_k=50), dict(top_k=0, top_p=0.9), dict(top_k=50, top_p=0.9, temperature=0.7),
         dict(top_k=0, temperature=1.3), dict(top_k=5, top_p=0.5), dict(top_k=0, top_p=0.2, temperature=0.5),
         dict(top_k=3000, top_p=0.99)]


def _warp_rows(seed: int) -> np.ndarray:
    """Rows of scores of several shapes: wide and narrow, peaked, flat, with ties and -inf."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal(5000) * 3, rng.standard_normal(5000) * 40, rng.standard_normal(5000) * 0.1,
            np.round(rng.standard_normal(5000) * 2), rng.standard_normal(5000)]
    rows[4][rng.random(5000) < 0.5] = -np.inf
    rows[0][17] = 30.0  # one peaked token
    tail = rng.standard_normal(5000) * 1e-3  # one token of 0.88 and a flat tail of 0.12: top-p's boundary in the tail
    tail[42] = np.log(0.88 / 0.12 * 4999)
    return np.stack([*rows, tail]).astype(np.float32)


@pytest.mark.parametrize("options", WARPS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_warpers_equal_transformers(options):
    """warp (temperature, top-k, top-p) leaves the tokens transformers' warpers leave, with their scores. Top-p
    sorts the row: torch.sort puts equal scores in no set order, warp in column order, so rows with ties are left
    out of top-p's comparison (the tests below use them against warp)."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    from xmtf_onnx.runtime.generation import warp

    config = _sampling_config(**options)
    scores = _warp_rows(0)
    if config.top_p < 1:
        scores = np.delete(scores, 3, axis=0)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature)]
                                  + ([TopKLogitsWarper(config.top_k)] if config.top_k else [])
                                  + ([TopPLogitsWarper(config.top_p)] if config.top_p < 1 else []))
    expected = warpers(None, torch.from_numpy(scores.copy())).numpy()
    got = warp(scores.copy(), config)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-6)


@pytest.mark.parametrize("options", WARPS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sampling_distribution_equals_softmax_of_the_warped_row(options):
    """sampling_distribution, which sampling draws from without sorting the whole row: the columns warp leaves
    (and, with neither top-k nor top-p, the -inf ones at probability 0) and softmax's probabilities over them, on rows
    wide, narrow, peaked, flat, tied and half -inf."""
    from xmtf_onnx.runtime.generation import sample_columns, sampling_distribution, softmax, warp

    config = _sampling_config(**options)
    scores = _warp_rows(1)
    reference = softmax(warp(scores.copy(), config).astype(np.float64))
    for row in range(scores.shape[0]):
        columns, probabilities = sampling_distribution(scores[row], config)
        columns = np.arange(scores.shape[1]) if columns is None else columns
        np.testing.assert_array_equal(columns[probabilities > 0], np.flatnonzero(reference[row] > 0))
        np.testing.assert_allclose(probabilities, reference[row][columns], rtol=1e-6, atol=1e-12)
    columns, log_probs = sample_columns(scores, config, np.random.default_rng(5), with_log_probs=True)
    assert (reference[np.arange(len(columns)), columns] > 0).all()
    np.testing.assert_allclose(log_probs, np.log(reference[np.arange(len(columns)), columns]), atol=1e-5)


def test_sampling_refuses_rows_it_cannot_draw_from():
    from xmtf_onnx.runtime.errors import InferenceError
    from xmtf_onnx.runtime.generation import sample_columns

    scores = _warp_rows(2)
    scores[2, 10] = np.nan
    with pytest.raises(InferenceError, match="NaN, infinite or all -inf"):
        sample_columns(scores, _sampling_config(top_k=50), np.random.default_rng(0))


def _sampling_config(**options):
    from xmtf_onnx.runtime.generation import GenerationConfig

    fields = dict(max_new_tokens=4, min_new_tokens=0, num_beams=1, num_return_sequences=1, length_penalty=1.0,
                  early_stopping=False, eos_token_id=(1,), pad_token_id=0, stop_strings=(), no_repeat_ngram_size=0,
                  repetition_penalty=1.0, do_sample=True, temperature=1.0, top_k=50, top_p=1.0, seed=None,
                  output_scores=False)
    fields.update(options)
    return GenerationConfig(**fields)


SCREENED = [dict(max_new_tokens=12), dict(max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2),
            dict(max_new_tokens=10, min_new_tokens=10)]


@pytest.mark.parametrize("options", SCREENED, ids=["greedy", "penalties", "min_new_tokens"])
def test_screened_greedy_equals_transformers(family, options):
    """Greedy without scores picks its tokens through the screen; it must stay token-for-token exact, both where
    the screen certifies a row and where it falls back to the full logits."""
    model, rows, eos, (expected, _) = _case(family, options)
    output = model.generate(input_ids=rows, eos_token_id=eos, output_scores=False, **options)
    assert output.sequences == expected
    assert output.metrics["screened_rows"] > 0
    screen = model.runner.screen

    def uncertain_even_rows(hidden, candidates):  # as if the bound were useless on every other row
        ids, exact, rest = screen(hidden, candidates)
        rest[::2] = np.inf
        return ids, exact, rest

    model.runner.screen = uncertain_even_rows
    mixed = model.generate(input_ids=rows, eos_token_id=eos, output_scores=False, **options)
    assert mixed.sequences == expected
    assert mixed.metrics["screened_rows"] > 0 and mixed.metrics["full_rows"] > 0
    plain = load(family["export"], greedy_screen=False).generate(input_ids=rows, eos_token_id=eos,
                                                                 output_scores=False, **options)
    assert plain.sequences == expected and plain.metrics["screened_rows"] == 0


def test_cache_buffers_alternate_and_overflow_falls_back(family):
    """The portable decoder's CPU cache lives in buffers sized for the request; a request that outgrows them (a
    capacity too small) still decodes the same, on freshly allocated presents."""
    model = load(family["export"], shared_cache=False)
    runner = model.runner
    ids, mask = model._batch([[5, 6, 7, 8], [9, 10]], model.tokens["pad_token_id"])
    sized, unsized = runner.begin(ids, mask, 2, 2), runner.begin(ids, mask, 2)
    hidden = [runner.prefill(sized), runner.prefill(unsized)]
    rows = hidden[0].shape[0]
    for step in range(5):  # past the capacity of 2 new tokens
        tokens, order = np.full(rows, 11 + step), np.arange(rows)[::-1].copy()
        hidden = [runner.decode_step(sized, tokens, order), runner.decode_step(unsized, tokens, order)]
        np.testing.assert_allclose(hidden[0], hidden[1], rtol=1e-5, atol=1e-5)
    assert sized.buffers is not None and unsized.buffers is None


def test_prepacked_cache_gives_the_same_tokens_and_is_reused(bloom_export, tmp_path):
    from xmtf_onnx.runtime import load

    rows = [[5, 9, 33, 17], [120, 7]]
    plain = load(bloom_export).generate(input_ids=rows, max_new_tokens=6, num_beams=2)
    cache = tmp_path / "packed"
    first = load(bloom_export, prepacked_cache=cache).generate(input_ids=rows, max_new_tokens=6, num_beams=2)
    entries = sorted(os.listdir(cache))
    assert first.sequences == plain.sequences and entries and all(not e.startswith(".") for e in entries)
    stamps = {e: os.stat(cache / e / "packed.onnx").st_mtime_ns for e in entries}
    again = load(bloom_export, prepacked_cache=cache).generate(input_ids=rows, max_new_tokens=6, num_beams=2)
    assert again.sequences == plain.sequences
    assert {e: os.stat(cache / e / "packed.onnx").st_mtime_ns for e in sorted(os.listdir(cache))} == stamps


def test_log_softmax_on_threads_equals_one_thread():
    """Beam rows' log-softmax is spread over the model's threads; chunk by chunk it is the same arithmetic."""
    from xmtf_onnx.runtime.generation import log_softmax_inplace

    scores = np.random.default_rng(0).standard_normal((32, 70_000)).astype(np.float32) * 5
    one, two = log_softmax_inplace(scores.copy(), threads=1), log_softmax_inplace(scores.copy(), threads=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_allclose(np.exp(one).sum(axis=1), 1.0, rtol=1e-4)


def test_cache_is_written_over_the_past_when_the_export_allows(family):
    """One cache buffer per layer (the present written over the past it reorders), with the same tokens and scores
    as two buffers used in turn, the only way for folders whose manifest does not allow it (the portable decoder's
    cache; the shared-buffer form has one buffer by construction)."""
    model = load(family["export"], shared_cache=False)
    assert model.manifest.cache["present_may_overwrite_past"] and model.runner.in_place
    sets = []
    presents = model.runner._presents

    def spy(state, rows, length):
        values = presents(state, rows, length)
        sets.append(len(state.buffers) if state.buffers else 0)
        return values

    model.runner._presents = spy
    rows = _prompts(family, model)
    options = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=2, output_scores=True)
    in_place = model.generate(input_ids=rows, **options)
    assert set(sets) == {1}
    sets.clear()
    model.runner.in_place = False
    alternating = model.generate(input_ids=rows, **options)
    assert set(sets) == {2}
    assert in_place.sequences == alternating.sequences and in_place.scores == alternating.scores


def test_log_softmax_graph_is_valid_onnx_and_matches_numpy():
    """The runtime's own one-node LogSoftmax model (serialized without the onnx package) is a valid ONNX model and
    computes numpy's log_softmax; beam search reads its output."""
    import onnx

    from xmtf_onnx.runtime.generation import log_softmax_inplace
    from xmtf_onnx.runtime.session import log_softmax_model, small_session

    model = onnx.load_from_string(log_softmax_model())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["LogSoftmax"]
    logits = np.random.default_rng(0).normal(0, 8, (5, 3001)).astype(np.float32)
    got = small_session(log_softmax_model(), 2).run(None, {"logits": logits})[0]
    np.testing.assert_allclose(got, log_softmax_inplace(logits.copy(), threads=1), atol=2e-5)


def test_log_probs_written_into_the_buffer_given(family):
    """Beam search hands the runner its previous step's scores to write into: the same values as a fresh array,
    in that very buffer; a buffer of another shape is not used."""
    model = load(family["export"])
    hidden = np.random.default_rng(1).standard_normal((3, model.runner.sessions["head"].get_inputs()[0].shape[-1]))
    hidden = hidden.astype(np.float32)
    fresh = model.runner.log_probs(hidden)
    buffer = np.full_like(fresh, np.nan)
    assert model.runner.log_probs(hidden, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, fresh)
    other = np.zeros((2, fresh.shape[1]), np.float32)
    got = model.runner.log_probs(hidden, out=other)
    assert got is not other and not other.any()
    np.testing.assert_array_equal(got, fresh)


def test_shared_cache_decoder_equals_the_portable_one(family):
    """On the CPU the decoder's shared-buffer form (GroupQueryAttention writing each step into one buffer per
    layer; beams reordered between steps on the rows that move) gives the tokens of the portable form, which
    copies the cache every step: greedy, beams and seeded sampling, on a padded batch."""
    shared, portable = load(family["export"]), load(family["export"], shared_cache=False)
    assert shared.shared_cache and not portable.shared_cache
    inputs = {i.name for i in shared.sessions["decoder"].get_inputs()}
    assert "beam_idx" not in inputs and "beam_idx" in {i.name for i in portable.sessions["decoder"].get_inputs()}
    rows = _prompts(family, shared)
    for options in (dict(max_new_tokens=9), dict(max_new_tokens=9, num_beams=3, num_return_sequences=2),
                    dict(max_new_tokens=9, do_sample=True, top_k=20, seed=7, num_return_sequences=2)):
        a = shared.generate(input_ids=rows, output_scores=True, **options)
        b = portable.generate(input_ids=rows, output_scores=True, **options)
        assert a.sequences == b.sequences, options
        np.testing.assert_allclose(np.concatenate([np.ravel(s) for s in a.scores]),
                                   np.concatenate([np.ravel(s) for s in b.scores]), rtol=1e-4, atol=1e-4)


def test_shared_cache_grows_and_reorders_beams_in_place(family):
    """Buffers sized for the request when its length is known, grown (cache copied) when not; reordered rows take
    their beam's cache: the hidden states of both equal the portable decoder's at every step."""
    shared, portable = load(family["export"]), load(family["export"], shared_cache=False)
    ids, mask = shared._batch([[5, 6, 7, 8], [9, 10]], shared.tokens["pad_token_id"])
    states = [shared.runner.begin(ids, mask, 2, 3), shared.runner.begin(ids, mask, 2),
              portable.runner.begin(ids, mask, 2, 3)]
    runners = [shared.runner, shared.runner, portable.runner]
    hidden = [runner.prefill(state) for runner, state in zip(runners, states)]
    rows = hidden[0].shape[0]
    buffers, unknown = states[0].shared, states[1].shared
    orders = [np.array([1, 1, 2, 3]), np.array([0, 0, 3, 2]), np.arange(rows)[::-1].copy(), np.arange(rows),
              np.array([2, 3, 0, 1])] * 4  # 20 steps: the unknown request's 16 positions grow (its binding anew)
    for step, order in enumerate(orders):
        order = order % rows
        tokens = np.full(rows, 11 + step)
        hidden = [runner.decode_step(state, tokens, order) for runner, state in zip(runners, states)]
        np.testing.assert_allclose(hidden[0], hidden[2], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(hidden[1], hidden[2], rtol=1e-4, atol=1e-4)
        if step < 2:  # within the 3 new tokens (and the start token) the request asked room for
            assert states[0].shared is buffers
    length = shared.runner.past_length(states[1])
    assert states[1].shared[0].shape[2] >= length > unknown[0].shape[2] and shared.runner.past_length(states[0]) == length
    real = states[2].attention_mask.astype(bool)  # [rows, length]: a padded position's cache is never read
    np.testing.assert_allclose(np.stack(shared.runner.cache_arrays(states[1])).transpose(0, 1, 3, 2, 4)[:, real],
                               np.stack([v.numpy() for v in states[2].past]).transpose(0, 1, 3, 2, 4)[:, real],
                               rtol=1e-4, atol=1e-4)


def test_wide_rows_are_told_by_their_own_maximum():
    from xmtf_onnx.runtime.runners import wide_rows

    rng = np.random.default_rng(0)
    normal = rng.uniform(-80, 0, 50000)
    wide = rng.uniform(-150, -88, 50000)  # most exps below float32's normal range
    peaked = rng.uniform(-5, 5, 50000)
    peaked[1234] = 120.0  # one peak a sample misses: every other exp is a denormal
    wide[0] = 0.0
    assert wide_rows(np.stack([normal, wide, peaked]).astype(np.float32)).tolist() == [False, True, True]


@pytest.mark.parametrize("every_row", [True, False], ids=["floored-numpy", "in-place-onnxruntime"])
@pytest.mark.parametrize("options", [SETTINGS[1], SETTINGS[3]], ids=["beams4", "beams4-processors"])
def test_log_probs_by_row_equal_transformers(family, options, every_row, monkeypatch):
    """The path a CPU with slow denormals takes (runners.slow_denormals): the head writes into the step's buffer,
    wide rows are done by numpy with exp's argument floored, the others by onnxruntime in place. Beam search on it
    equals transformers, with every row taken either way."""
    from xmtf_onnx.runtime import runners

    monkeypatch.setattr(runners, "slow_denormals", lambda: True)
    monkeypatch.setattr(runners, "WIDE_SHARE", -1.0 if every_row else 2.0)
    model, rows, eos, (expected, expected_scores) = _case(family, options)
    output = model.generate(input_ids=rows, eos_token_id=eos, output_scores=True, **options)
    assert output.sequences == expected
    np.testing.assert_allclose(output.scores, expected_scores, atol=1e-3, rtol=1e-3)


def test_log_probs_by_row_do_not_depend_on_the_batch(family, monkeypatch):
    """Rows of both kinds mixed in one call: each row's log-probabilities are bit for bit those of the row alone, and
    equal float64's log_softmax of the head's logits."""
    from xmtf_onnx.runtime import runners

    monkeypatch.setattr(runners, "slow_denormals", lambda: True)
    monkeypatch.setattr(runners, "wide_rows", lambda scores, maxima=None: scores[:, 0] > scores[:, 1])
    model = load(family["export"])
    runner = model.runner
    hidden = np.random.default_rng(3).standard_normal((7, runner.sessions["head"].get_inputs()[0].shape[-1]))
    hidden = hidden.astype(np.float32)
    logits = runner.logits(hidden).astype(np.float64)
    assert 0 < (logits[:, 0] > logits[:, 1]).sum() < 7, "the rows should take both paths"
    together = runner.log_probs(hidden)
    again = runner.log_probs(hidden, out=together)  # the previous step's buffer, as beam search passes it
    assert again is together
    for row in range(7):
        assert np.array_equal(runner.log_probs(hidden[row:row + 1])[0], together[row])
    shifted = logits - logits.max(axis=1, keepdims=True)
    reference = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(together, reference, atol=1e-5)
