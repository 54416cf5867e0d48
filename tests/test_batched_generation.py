"""Batched decoding of prompts of different lengths (`DecodeBatch`, `RowPositions`): every row gets the tokens it
would get decoded alone, for learned positions (GPT-2) and RoPE with grouped-query attention (Llama, Qwen3)."""

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.generate import DecodeBatch, Row, generate_ids
from llmscratch.model.attention import RowPositions
from llmscratch.model.transformer import GPT

PRESETS = ["gpt-micro", "llama-micro", "qwen3-micro"]


def _model(preset: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset(preset, **overrides)).eval()


def _alone(model, prompt: list[int], n: int, **sampling) -> list[int]:
    return [int(t[0]) for t in generate_ids(model, torch.tensor([prompt]), n, **sampling)]


def _prompts(vocab: int, lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", PRESETS)
def test_rows_of_different_lengths_equal_decoding_alone(preset):
    model = _model(preset)
    prompts = _prompts(model.config.vocab_size, [1, 7, 3, 12, 5])
    batch = DecodeBatch(model, max_rows=5)
    rows = [Row(p) for p in prompts]
    for r in rows:
        batch.add(r)
    for _ in range(20):
        batch.step()
    batch.close()
    for p, r in zip(prompts, rows):
        assert r.generated == _alone(model, p, 20)
    assert not model.has_kv_cache  # close() frees the cache


@pytest.mark.parametrize("preset", PRESETS)
def test_rows_join_and_leave_mid_generation(preset):
    """Continuous batching: 2 places for 5 sequences; a row leaves after its own number of tokens and a waiting
    one takes its place (its cache row is the last row's, moved), the others decoding on undisturbed."""
    model = _model(preset)
    prompts = _prompts(model.config.vocab_size, [4, 9, 2, 6, 11], seed=2)
    wanted = [3, 15, 8, 1, 10]
    batch = DecodeBatch(model, max_rows=2, max_len=8)  # a short cache: it grows as the rows need
    rows = [Row(p, key=i) for i, p in enumerate(prompts)]
    for r in rows:
        batch.add(r)
    while len(batch):
        assert len(batch.active) <= 2 or not batch.waiting
        for row, _ in batch.step():
            if len(row.generated) == wanted[row.key]:
                batch.remove(row)
    batch.close()
    for p, r, n in zip(prompts, rows, wanted):
        assert r.generated == _alone(model, p, n)


def test_rows_slide_past_the_context_as_alone():
    model = _model("llama-micro", context_length=16)
    prompts = _prompts(model.config.vocab_size, [3, 14], seed=3)
    rows = [Row(p) for p in prompts]
    batch = DecodeBatch(model, max_rows=2)
    for r in rows:
        batch.add(r)
    for _ in range(12):  # both pass the 16-token context
        batch.step()
    batch.close()
    for p, r in zip(prompts, rows):
        assert r.generated == _alone(model, p, 12)


def test_a_seeded_sampled_row_does_not_depend_on_its_neighbours():
    model = _model("gpt-micro")
    prompts = _prompts(model.config.vocab_size, [5, 2, 8], seed=4)
    sampling = dict(temperature=1.0, top_k=20, top_p=0.9)

    def run(which):
        batch = DecodeBatch(model, max_rows=3)
        rows = [Row(prompts[i], seed=7, **sampling) for i in which]
        for r in rows:
            batch.add(r)
        for _ in range(10):
            batch.step()
        batch.close()
        return rows[which.index(0)].generated

    alone = _alone(model, prompts[0], 10, seed=7, **sampling)
    assert run([0]) == alone
    assert run([1, 0, 2]) == alone


def test_row_positions_mask_keeps_rows_apart():
    at = RowPositions.make([2, 0], 3, rows=[4, 1])
    assert at.positions.tolist() == [[2, 3, 4], [0, 1, 2]]
    assert at.first_row is None and at.rows.tolist() == [4, 1] and at.length == 5
    assert at.mask.shape == (2, 1, 3, 5)
    assert at.mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert RowPositions.make([0, 5], 1, rows=[3, 4]).first_row == 3


def test_prefill_of_padded_rows_equals_unpadded_logits():
    """The logits a row's prompt gets right-padded in a batch equal those of the prompt alone."""
    model = _model("qwen3-micro")
    a, b = _prompts(model.config.vocab_size, [3, 9], seed=5)
    with torch.no_grad():
        alone = model(torch.tensor([a]))[0]
        model.setup_kv_cache(2, 16)
        idx = torch.tensor([a + [0] * 6, b])
        batched = model(idx, input_pos=RowPositions.make([0, 0], 9))
        model.clear_kv_cache()
    torch.testing.assert_close(batched[0, :3], alone, atol=1e-5, rtol=1e-5)


def test_empty_prompt_and_bad_batch_size():
    from llmscratch.errors import UserError

    with pytest.raises(UserError, match="empty"):
        Row([])
    with pytest.raises(UserError, match="batch size"):
        DecodeBatch(_model("gpt-micro"), max_rows=0)


@pytest.mark.parametrize("preset,chunk", [("gpt-micro", 4), ("qwen3-micro", 4), ("llama-micro", 20)])
def test_prompts_in_small_chunks_equal_decoding_alone(preset, chunk):
    """Chunked prefill: `chunk` prompt tokens a step, shared by the new rows (with 20, rows fed 9, 2 and 9 tokens
    in one call), prompts split across steps while the rows already decoding go on; a row's first token comes
    the step its last chunk goes in."""
    model = _model(preset)
    prompts = _prompts(model.config.vocab_size, [9, 2, 13, 5], seed=6)
    batch = DecodeBatch(model, max_rows=4, prefill_tokens=chunk)
    rows = [Row(p) for p in prompts]
    for r in rows:
        batch.add(r)
    first = batch.step()
    assert [r for r, _ in first] == ([] if chunk == 4 else rows[:2])  # rows whose whole prompt went in
    for _ in range(25):
        batch.step()
    batch.close()
    for p, r in zip(prompts, rows):
        n = len(r.generated)
        assert n >= 15 and r.generated == _alone(model, p, n)


def test_padding_of_rows_fed_fewer_tokens_is_not_written():
    """Rows fed 3 and 1 tokens in one call: the padded slots of the short row keep what the cache held."""
    model = _model("llama-micro")
    at = RowPositions.make([5, 0], [1, 3])
    assert at.positions.tolist() == [[5, 5, 5], [0, 1, 2]] and at.real.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert at.length == 6
    with torch.no_grad():
        model.setup_kv_cache(2, 16)
        cache = model.blocks[0].attn.kv_cache
        cache.k[0, :, 6:8] = 7.0
        model(torch.tensor([[1, 0, 0], [4, 5, 6]]), input_pos=at)
        assert bool((cache.k[0, :, 6:8] == 7.0).all()) and not bool((cache.k[0, :, 5] == 0).all())
        model.clear_kv_cache()
