"""Continuous batching: rows that join a running batch and leave it give what generate() gives each alone."""

from __future__ import annotations

import numpy as np
import pytest

from xmtf_onnx.runtime import GenerationInputError, load

from test_generate import _prompts


def _batch_invariant_model(family, variant: str, tmp_path):
    """The family's tiny model in `variant` (exported here unless fp32); the test is skipped where this machine
    computes its rows differently alone and batched, since the server then does not batch it."""
    folder = family["export"]
    if variant != "fp32":
        from xmtf_onnx.export import export

        folder = export(str(family["checkpoint"]), tmp_path / variant, quantize=[variant], fp32=False, progress=False)
    model = load(folder)
    if not model.batch_invariant:
        pytest.skip(f"{variant} is batch-variant on this machine ({model.batch_variance}): the server runs it alone")
    return model


@pytest.mark.parametrize("variant", ["fp32", "int8-weight", "int4-weight"])
def test_rows_joining_and_leaving_equal_generate_alone(family, variant, tmp_path):
    """fp32 and the weight-only variants, where this machine computes their rows alike alone and batched
    (Model.batch_invariant; MatMulNBits quantizes each row's activations alone, but may take another path for one
    row); int8-dynamic quantizes a whole batch's activations with one scale, so it is not (the server knows)."""
    model = _batch_invariant_model(family, variant, tmp_path)
    prompts = _prompts(family, model, 5)
    eos = model.tokens["eos_token_id"]
    lengths, minimum = [9, 4, 12, 6, 7], [0, 4, 12, 0, 3]
    alone = [model.generate(input_ids=[p], max_new_tokens=n, min_new_tokens=m).sequences[0]
             for p, n, m in zip(prompts, lengths, minimum)]
    batch = model.continuous_batch()
    got: dict[int, list[int]] = {}

    def admit(indices):
        for index, token in zip(indices, batch.admit([prompts[i] for i in indices], indices,
                                                     [minimum[i] for i in indices])):
            got[index] = [int(token)]

    def step():
        for index, token in zip(batch.owners, batch.step()):
            got[index].append(int(token))

    def finished(index):
        return len(got[index]) >= lengths[index] or got[index][-1] in eos

    admit([0])
    step(), step()
    admit([1, 2])  # join a batch two tokens in: different prompt and cache lengths
    step()
    admit([3])
    for _ in range(3):
        batch.keep(np.array([not finished(i) for i in batch.owners]))
        step()
    batch.keep(np.array([i != 2 and not finished(i) for i in batch.owners]))  # row 2 cancelled mid-way
    admit([4])
    while batch.rows:
        batch.keep(np.array([not finished(i) for i in batch.owners]))
        if batch.rows:
            step()
    for index in (0, 1, 3, 4):
        assert got[index] == alone[index], index
    assert got[2] == alone[2][:len(got[2])]


SAMPLED_ROWS = [dict(do_sample=True, seed=3), dict(), dict(do_sample=True, seed=4, temperature=0.7, top_p=0.9),
                dict(do_sample=True, seed=5, top_k=0, temperature=1.5), dict(do_sample=True, seed=3)]


@pytest.mark.parametrize("variant", ["fp32", "int8-weight"])
def test_sampled_rows_joining_a_batch_equal_generate_alone(family, variant, tmp_path):
    """Sampled rows, each with its own seed and warpers, join and leave a batch beside greedy rows: every row gets
    the tokens generate() gives that one prompt alone with the same options (one draw from its seeded generator
    per step), and two rows of one seed and prompt agree while a different seed differs."""
    model = _batch_invariant_model(family, variant, tmp_path)
    prompts = _prompts(family, model, 5)
    prompts[4] = prompts[0]
    lengths, minimum = [10, 6, 9, 8, 10], [10, 0, 2, 8, 10]
    alone = [model.generate(input_ids=[p], max_new_tokens=n, min_new_tokens=m, **o).sequences[0]
             for p, n, m, o in zip(prompts, lengths, minimum, SAMPLED_ROWS)]
    batch = model.continuous_batch()
    got: dict[int, list[int]] = {}

    def admit(indices):
        samplers = [batch.sampler(**SAMPLED_ROWS[i]) for i in indices]
        assert [s is None for s in samplers] == [not SAMPLED_ROWS[i] for i in indices]
        for index, token in zip(indices, batch.admit([prompts[i] for i in indices], indices,
                                                     [minimum[i] for i in indices], samplers)):
            got[index] = [int(token)]

    def step():
        batch.keep(np.array([len(got[i]) < lengths[i] and got[i][-1] not in model.tokens["eos_token_id"]
                             for i in batch.owners]))
        for index, token in zip(batch.owners, batch.step() if batch.rows else []):
            got[index].append(int(token))

    admit([0, 1])
    step(), step()
    admit([2])
    step()
    admit([3, 4])
    while batch.rows:
        step()
    assert got == dict(enumerate(alone))
    assert got[4] == got[0]
    other = model.generate(input_ids=[prompts[0]], max_new_tokens=10, min_new_tokens=10, do_sample=True, seed=99)
    assert other.sequences[0] != got[0], "another seed should draw other tokens on a random model"


def test_a_sampled_request_of_several_sequences_equals_generate_alone(family, tmp_path):
    """One prompt, n = 3 sequences sharing the request's seeded generator, admitted beside a greedy row: the rows
    draw in generate()'s row order, and a row that finishes first (a forced eos cut) keeps burning its uniform as
    generate() alone keeps drawing for it, so the others stay equal to generate(num_return_sequences=3)."""
    model = _batch_invariant_model(family, "fp32", tmp_path)
    prompt, other = _prompts(family, model, 2)
    options = dict(do_sample=True, seed=21, temperature=0.9, top_k=20)
    expected = model.generate(input_ids=[prompt], max_new_tokens=8, min_new_tokens=8, num_return_sequences=3,
                              **options).sequences
    batch = model.continuous_batch()
    sampler = batch.sampler(**options)
    got = {index: [int(t)] for index, t in zip(range(3), batch.admit([prompt] * 3, [0, 1, 2], [8] * 3,
                                                                      [sampler] * 3))}
    got[3] = [int(batch.admit([other], [3], [0])[0])]
    while batch.rows:
        cut = {0: 3, 1: 8, 2: 5, 3: 4}  # rows leave at these lengths (a client's stop, or cancelled)
        batch.keep(np.array([len(got[i]) < cut[i] for i in batch.owners]))
        if batch.rows:
            for index, token in zip(batch.owners, batch.step()):
                got[index].append(int(token))
    assert [got[i] for i in range(3)] == [expected[0][:3], expected[1], expected[2][:5]]
    assert len(set(map(tuple, expected))) > 1, "three draws from one seed should differ on a random model"


def test_continuous_batch_refuses_what_it_cannot_do(family):
    model = load(family["export"])
    for options in (dict(do_sample=True), dict(num_beams=2), dict(repetition_penalty=1.2)):
        with pytest.raises(GenerationInputError, match="continuous batching"):
            model.continuous_batch(**options)
    with pytest.raises(GenerationInputError, match="sets only do_sample"):
        model.continuous_batch().sampler(do_sample=True, num_beams=2)


def test_batch_invariance_is_known_per_variant(family, tmp_path):
    """int8-dynamic quantizes a batch's activations with one scale: never batch-invariant. The others are measured on
    the machine (onnxruntime may compute one row by another path than several): either answer, with its reason."""
    from xmtf_onnx.export import export

    folder = export(str(family["checkpoint"]), tmp_path / "q", quantize=["int8-dynamic", "int4-weight"], progress=False)
    assert not load(folder, variant="int8-dynamic").batch_invariant
    assert "one scale" in load(folder, variant="int8-dynamic").batch_variance
    for variant in ("fp32", "int4-weight"):
        model = load(folder, variant=variant)
        assert model.batch_invariant == (model.batch_variance is None)
        assert model.batch_variance in (None, "onnxruntime computes one row by another path than several on this "
                                              "machine")


def test_batch_invariance_is_measured_on_this_machine(family, monkeypatch):
    """A kernel that computes one row by another path than several (the Intel Xeon guest's 8-bit MatMulNBits, in
    the last bits) makes the variant batch-variant, and the server then runs its requests alone."""
    model = load(family["export"])
    assert model.batch_invariant
    other = load(family["export"])
    logits = other.runner.logits

    def one_row_apart(hidden):
        out = logits(hidden)
        return out + np.float32(1e-6) * (hidden.shape[0] == 1)
    monkeypatch.setattr(other.runner, "logits", one_row_apart)
    assert not other.batch_invariant and "another path" in other.batch_variance


def test_rows_are_never_padded_and_cohorts_of_one_length_share_a_decoder_run(family):
    """Rows keep joining and leaving: each cohort's cache is exactly its rows' length (nothing padded, so a row's
    numbers are those of generate() alone), rows that joined together with prompts of one length share a
    cohort, and every row gets what generate() gives it alone."""
    model = load(family["export"])
    prompts = _prompts(family, model, 5)
    prompts = prompts + [list(prompts[0])]  # a second row like the first: they share a cohort
    alone = [model.generate(input_ids=[p], max_new_tokens=4).sequences[0] for p in prompts]
    batch = model.continuous_batch()
    got: dict[int, list[int]] = {}
    waiting = [[0, 5], [1], [2], [3], [4]]
    for round_ in range(40):
        if waiting and round_ % 2 == 0:
            indices = waiting.pop(0)
            for index, token in zip(indices, batch.admit([prompts[i] for i in indices], indices, [0] * len(indices))):
                got[index] = [int(token)]
            if indices == [0, 5]:
                assert len(batch.cohorts) == 1 and batch.cohorts[0].owners == [0, 5]
        elif batch.rows:
            for index, token in zip(batch.owners, batch.step()):
                got[index].append(int(token))
        batch.keep(np.array([len(got[i]) < 4 and got[i][-1] not in model.tokens["eos_token_id"]
                             for i in batch.owners]))
        for cohort in batch.cohorts:
            # the fed tokens: BLOOM's prompt or mT5's start token, then every token but the latest
            fed = {(len(prompts[i]) if model.kind == "decoder" else 1) + len(got[i]) - 1 for i in cohort.owners}
            length = model.runner.past_length(cohort.state)
            assert len(fed) == 1 and length == cohort.state.attention_mask.shape[1] == fed.pop()
            assert cohort.state.attention_mask.all()  # no padded position
            if cohort.state.encoder_mask is not None:
                assert cohort.state.encoder_mask.all()
    assert got == dict(enumerate(alone))


def test_a_padded_batch_is_one_cohort_and_sheds_the_padding_of_rows_that_left(family):
    """--batching padded: every row in one decoder run, caches padded to one length; the positions no row
    attends any more (rows that left) are dropped, so a batch that never empties does not grow. (Its tokens
    can differ from generate() alone at near-ties on real shapes; on these tiny models they agree.)"""
    model = load(family["export"])
    prompts = _prompts(family, model, 5)
    alone = [model.generate(input_ids=[p], max_new_tokens=n).sequences[0] for p, n in zip(prompts, (6, 2, 5, 3, 4))]
    lengths = dict(enumerate(len(a) for a in alone))
    batch = model.continuous_batch(padded=True)
    got: dict[int, list[int]] = {}
    waiting = [[0], [1, 2], [3], [4]]
    for round_ in range(30):
        if waiting and round_ % 2 == 0:
            indices = waiting.pop(0)
            for index, token in zip(indices, batch.admit([prompts[i] for i in indices], indices, [0] * len(indices))):
                got[index] = [int(token)]
        elif batch.rows:
            for index, token in zip(batch.owners, batch.step()):
                got[index].append(int(token))
        batch.keep(np.array([len(got[i]) < lengths[i] for i in batch.owners]))
        assert len(batch.cohorts) <= 1
        if batch.rows:
            state = batch.cohorts[0].state
            fed = [(len(prompts[i]) if model.kind == "decoder" else 1) + len(got[i]) - 1 for i in batch.owners]
            assert model.runner.past_length(state) == state.attention_mask.shape[1] == max(fed)  # no column unused
    assert got == dict(enumerate(alone))
