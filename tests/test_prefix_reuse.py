"""Prefix reuse: a conversation's next turn (`KeptPrefix`, what `chat` keeps) and a batched decoder's new rows
(`DecodeBatch`'s parked rows, what `serve` keeps) start after the tokens their KV cache already holds, and get the
tokens a fresh start gets. The models run in float64, so the other order of sums in a reused prefix cannot flip a
greedy token; how many tokens each forward reads is counted at the token embedding."""

import importlib

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.generate import DecodeBatch, KeptPrefix, Row, common_prefix, generate_ids
from llmscratch.model.transformer import GPT

PRESETS = ["gpt-micro", "llama-micro", "mla-micro"]
gen = importlib.import_module("llmscratch.generate")  # (the package's `generate` is the function)


def _model(preset: str = "gpt-micro", context_length: int = 128) -> GPT:
    torch.manual_seed(0)
    window = {"sliding_window": 24} if preset == "gemma3-micro" else {}
    return GPT(ModelConfig.from_preset(preset, context_length=context_length, **window)).double().eval()


def _ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Reads:
    """The number of tokens of each forward of `model` (its rows' width), in order."""

    def __init__(self, model):
        self.widths: list[int] = []
        model.tok_emb.register_forward_hook(lambda m, args, out: self.widths.append(args[0].size(1)))


def _entries(cache, row: int, n: int) -> list[torch.Tensor]:
    """What a layer's cache holds for batch row `row`'s first n positions (keys and values, or MLA's latent and
    rotated key)."""
    if hasattr(cache, "latent"):
        return [cache.latent[row, :n], cache.k_rope[row, :n]]
    return [cache.k[row, :, :n], cache.v[row, :, :n]]


def assert_holds(model, row: int, ids: list[int], preset: str = "gpt-micro") -> None:
    """Cache row `row` of `model` holds exactly the entries of `ids` at positions 0, 1, ..., as a fresh model
    reading them computes them."""
    fresh = _model(preset, model.config.context_length)
    fresh.setup_kv_cache(1, len(ids))
    with torch.no_grad():
        fresh(torch.tensor([ids]), input_pos=0)
    for mine, theirs in zip(model.blocks, fresh.blocks):
        for a, b in zip(_entries(mine.attn.kv_cache, row, len(ids)), _entries(theirs.attn.kv_cache, 0, len(ids))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # (decoding attends in fp32)


def assert_batch_holds(batch: DecodeBatch, preset: str = "gpt-micro") -> None:
    """Every active row holds its window's first `cached` tokens, every parked row the ids it is parked with."""
    for i, r in enumerate(batch.active):
        if r.cached:
            assert_holds(batch.model, i, r.ids[-batch.ctx:][:r.cached], preset)
    for i, ids in batch.parked.items():
        assert i >= len(batch.active)
        assert_holds(batch.model, i, ids, preset)


def _run(model, prompt: list[int], n: int, kept: KeptPrefix | None = None, **kw) -> list[int]:
    return [int(t[0]) for t in generate_ids(model, torch.tensor([prompt]), n, kept=kept, **kw)]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7], [8]) == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_a_conversations_turns_read_only_what_they_add(preset):
    model = _model(preset)
    reads = _Reads(model)
    kept = KeptPrefix()
    first = _ids(20, 1)
    answer = _run(model, first, 8, kept)
    assert kept.ids == first + answer[:-1]  # the last token sampled was never fed
    assert_holds(model, 0, kept.ids, preset)
    second = first + answer + _ids(5, 2)
    reads.widths.clear()
    got = _run(model, second, 8, kept)
    assert reads.widths == [6] + [1] * 7
    assert_holds(model, 0, kept.ids, preset)
    assert got == _run(model, second, 8)  # as from a fresh start (which frees the cache: the next turn starts over)
    # A prompt that shares only its first 10 tokens with the conversation so far reads from there on.
    kept = KeptPrefix()
    _run(model, second, 8, kept)
    third = second[:10] + _ids(7, 3)
    reads.widths.clear()
    got = _run(model, third, 4, kept)
    assert reads.widths[0] == 7 and got == _run(model, third, 4)


def test_a_prompt_the_cache_holds_whole_still_reads_its_last_token():
    model = _model()
    reads = _Reads(model)
    kept = KeptPrefix()
    prompt = _ids(12, 4)
    first = _run(model, prompt, 3, kept)
    reads.widths.clear()
    assert _run(model, prompt, 3, kept) == first  # the same prompt again: its last token gives the logits
    assert reads.widths == [1, 1, 1]
    reads.widths.clear()
    assert _run(model, prompt[:5], 3, kept) == _run(model, prompt[:5], 3)  # a shorter one: its last token too
    assert reads.widths[0] == 1


def test_nothing_is_reused_from_a_cache_that_was_replaced_or_freed():
    model = _model()
    reads = _Reads(model)
    kept = KeptPrefix()
    prompt = _ids(16, 5)
    _run(model, prompt, 4, kept)
    _run(model, _ids(9, 6), 2)  # another generation in between frees the cache (and would have overwritten it)
    reads.widths.clear()
    assert _run(model, prompt, 2, kept) == _run(model, prompt, 2)
    assert reads.widths[0] == len(prompt)


def test_two_conversations_on_one_model_never_reuse_each_others_entries():
    """Each generation with a `KeptPrefix` keeps the cache, so the next one finds the same cache object, now
    holding the other conversation's entries: only the conversation that wrote last may reuse it."""
    model = _model()
    reads = _Reads(model)
    one, two = KeptPrefix(), KeptPrefix()
    prompt = _ids(14, 15)
    answer = _run(model, prompt, 4, one)
    _run(model, prompt[:6] + _ids(8, 16), 4, two)  # shares 6 tokens with the first, overwrites from there on
    reads.widths.clear()
    longer = prompt + answer + _ids(3, 17)
    assert _run(model, longer, 2, one) == _run(model, longer, 2)
    assert reads.widths[0] == len(longer)


def test_a_generation_closed_early_keeps_what_it_fed():
    """Ctrl-C in `chat` or a stop string closes the generator at a token: what the cache holds is still whole."""
    model = _model()
    kept = KeptPrefix()
    prompt = _ids(10, 7)
    tokens = generate_ids(model, torch.tensor([prompt]), 20, kept=kept)
    first = [int(next(tokens)[0]) for _ in range(3)]
    tokens.close()
    assert kept.ids == prompt + first[:2]
    assert_holds(model, 0, kept.ids)


def test_a_generation_that_failed_midway_keeps_nothing():
    model = _model()
    kept = KeptPrefix()
    calls = []

    def fail_on_third(module, args, out):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.tok_emb.register_forward_hook(fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(model, _ids(10, 8), 10, kept)
    handle.remove()
    assert kept.ids == []
    reads = _Reads(model)
    prompt = _ids(10, 8) + _ids(3, 9)
    assert _run(model, prompt, 2, kept) == _run(model, prompt, 2)
    assert reads.widths[0] == len(prompt)


def test_a_window_that_slid_keeps_nothing():
    model = _model(context_length=32)
    kept = KeptPrefix()
    _run(model, _ids(28, 10), 10, kept)  # 28 + 10 > 32: the window slides, positions shift
    assert kept.ids == []


def test_sliding_window_models_reuse_what_their_window_still_holds():
    """gemma3-micro's local layers keep a ring of 24 positions here. Up to 24 held tokens, any shared part is reused
    (position p sits in slot p). Past that, the ring holds only the last 24: a prompt that repeats everything held
    goes on from there, one that departs earlier is read whole."""
    model = _model("gemma3-micro")
    reads = _Reads(model)
    kept = KeptPrefix()
    prompt = _ids(12, 11)
    answer = _run(model, prompt, 6, kept)  # 17 positions held
    reads.widths.clear()
    partial = prompt[:9] + _ids(3, 12)  # shares 9 of them
    assert _run(model, partial, 5, kept) == _run(model, partial, 5)
    assert reads.widths[0] == 3
    kept = KeptPrefix()
    _run(model, prompt, 6, kept)
    longer = prompt + answer + _ids(3, 12)
    reads.widths.clear()
    answer = _run(model, longer, 8, kept)  # 21 + 7 = 28 positions held: the ring wrapped
    assert reads.widths[0] == 4 and len(kept.ids) == 28
    assert_holds(model, 0, kept.ids, "gemma3-micro")
    follow = longer + answer + _ids(2, 13)  # repeats all 28
    reads.widths.clear()
    assert _run(model, follow, 3, kept) == _run(model, follow, 3)
    assert reads.widths[0] == 3
    kept = KeptPrefix()
    _run(model, follow, 3, kept)  # 32 held
    departs = follow[:20] + _ids(2, 14)
    reads.widths.clear()
    assert _run(model, departs, 3, kept) == _run(model, departs, 3)
    assert reads.widths[0] == len(departs)


def test_the_compiled_step_takes_single_tokens_after_a_reused_prefix(monkeypatch):
    """With a compiled-ahead step the cache has a fixed length per generation (a power of two on a CPU): a kept
    cache is resized to it with its entries; the prompt's new part goes through the model, each token after it
    through the step. The step here is the model's own static-shape call, as the compiled one computes it."""
    model = _model()
    fed = []

    class Step:
        on_gpu = False

        def __call__(self, idx, pos, same_shapes=False):
            fed.append((idx.size(1), int(pos)))
            return model(idx, input_pos=pos)[:, -1]

    monkeypatch.setattr(gen, "_compiled_ahead_step", lambda model, batch_size: Step())
    kept = KeptPrefix()
    first = _ids(30, 13)
    answer = _run(model, first, 10, kept, compiled_ahead=True)
    assert model.blocks[0].attn.kv_cache.max_len == 64
    second = first + answer + _ids(30, 14)  # 70 + 10 positions: the cache grows to 128, keeping its entries
    fed.clear()
    got = _run(model, second, 10, kept, compiled_ahead=True)
    assert model.blocks[0].attn.kv_cache.max_len == 128
    assert_holds(model, 0, kept.ids)
    assert fed == [(1, len(second) + i) for i in range(9)]
    monkeypatch.undo()
    assert got == _run(model, second, 10) == _run(model, second, 10, compiled_ahead=False)


# --- DecodeBatch: parked rows ------------------------------------------------------------------------------------
def _finish(batch: DecodeBatch, row: Row, n: int) -> None:
    """Step until `row` has n tokens, then take it out (as the server does when a request ends)."""
    while len(row.generated) < n:
        batch.step()
    batch.remove(row)


def _alone(row: Row, preset: str = "gpt-micro") -> list[int]:
    """The row's tokens decoded alone, by a model of its own (a generation frees the model's cache, and the
    batch's model still needs its own)."""
    return _run(_model(preset), row.ids[:row.n_prompt], len(row.generated))


@pytest.mark.parametrize("preset", PRESETS)
def test_a_follow_up_request_takes_over_the_parked_row(preset):
    model = _model(preset)
    batch = DecodeBatch(model, max_rows=2)
    a = Row(_ids(15, 20))
    batch.add(a)
    _finish(batch, a, 6)
    assert batch.parked == {0: a.ids[:-1]}
    assert_batch_holds(batch, preset)
    b = Row(a.ids + _ids(4, 21))
    batch.add(b)
    batch.step()
    assert_batch_holds(batch, preset)
    _finish(batch, b, 6)
    assert b.reused == len(a.ids) - 1 and batch.reused_tokens == b.reused
    assert b.generated == _alone(b, preset)
    batch.close()
    assert batch.parked == {}


def test_parked_rows_move_aside_and_the_oldest_gives_way():
    model = _model()
    batch = DecodeBatch(model, max_rows=2)
    a, b = Row(_ids(12, 30)), Row(_ids(9, 31))
    batch.add(a)
    _finish(batch, a, 3)  # a parked in row 0
    batch.add(b)  # b needs row 0: a moves to the free row 1
    batch.step()
    assert batch.parked == {1: a.ids[:-1]}
    assert_batch_holds(batch)
    _finish(batch, b, 3)  # b parked in row 0, after a
    assert list(batch.parked.items()) == [(1, a.ids[:-1]), (0, b.ids[:-1])]
    assert_batch_holds(batch)
    c = Row(_ids(5, 32))  # shares nothing: row 0's b moves over a, parked longest ago
    batch.add(c)
    batch.step()
    assert batch.parked == {1: b.ids[:-1]}
    assert_batch_holds(batch)
    d = Row(b.ids + _ids(3, 33))  # while c decodes, d follows b up from row 1
    batch.add(d)
    batch.step()
    assert_batch_holds(batch)
    _finish(batch, d, 4)
    assert d.reused == len(b.ids) - 1 and d.generated == _alone(d)
    _finish(batch, c, 4)
    assert c.reused == 0 and c.generated == _alone(c)
    e = Row(a.ids + _ids(2, 34))  # a was dropped: e reads its prompt whole
    batch.add(e)
    _finish(batch, e, 2)
    assert e.reused == 0 and e.generated == _alone(e)
    batch.close()


def test_rows_leaving_from_the_middle_are_parked_and_followed_up():
    """Three rows decode together; the first leaves while the others go on (the last moves into its place, it into
    the last's), then a follow-up of each one reuses it, alongside rows still decoding."""
    model = _model()
    batch = DecodeBatch(model, max_rows=4)
    rows = [Row(_ids(n, 40 + n)) for n in (7, 11, 5)]
    for r in rows:
        batch.add(r)
    _finish(batch, rows[0], 4)
    assert batch.parked == {2: rows[0].ids[:-1]}
    assert_batch_holds(batch)
    _finish(batch, rows[1], 6)
    _finish(batch, rows[2], 8)
    assert_batch_holds(batch)
    follow = [Row(r.ids + _ids(2, 50 + i)) for i, r in enumerate(rows)]
    for r in follow:
        batch.add(r)
    batch.step()
    assert_batch_holds(batch)
    for r in follow:
        _finish(batch, r, 5)
    for r, before in zip(follow, rows):
        assert r.reused == len(before.ids) - 1
        assert r.generated == _alone(r)
    batch.close()


@pytest.mark.parametrize("spare", [0, 2])
def test_spare_rows_keep_conversations_while_the_batch_is_full(spare):
    """Four conversations on a batch of two: each first turn that ends makes room for a waiting one, so without
    spare rows its keys and values are overwritten before its next turn comes; with two spare cache rows they are
    kept, and every next turn reads only what it adds. The tokens are a fresh start's either way."""
    model = _model()
    batch = DecodeBatch(model, max_rows=2, spare_rows=spare)
    assert model.blocks[0].attn.kv_cache.k.size(0) == 2 + spare
    first = [Row(_ids(6 + i, 60 + i)) for i in range(4)]
    for r in first:
        batch.add(r)
    for r in first:  # a and b decode, c and d wait; each one leaving lets the next in
        _finish(batch, r, 3)
        assert_batch_holds(batch)
    assert len(batch.parked) == min(4, 2 + spare)
    follow = [Row(r.ids + _ids(3, 70 + i)) for i, r in enumerate(first)]
    for r in follow:
        batch.add(r)
    for r in follow:
        _finish(batch, r, 3)
        assert_batch_holds(batch)
    for r in follow:
        assert r.generated == _alone(r)
    reused = [r.reused for r in follow]
    if spare:
        assert reused == [len(r.ids) - 1 for r in first]
    else:  # a's and b's rows went to c and d, then c's and d's to a's and b's next turns
        assert reused == [0, 0, 0, 0]
    batch.close()


@pytest.mark.parametrize("preset", PRESETS)
def test_a_shared_beginning_is_copied_and_the_parked_row_stays(preset):
    """Two conversations under one system prompt, one place in the batch and one spare row. B's first turn shares
    only the system prompt with A's parked turn: it gets a copy of those entries, and A's row stays parked, so
    A's next turn still finds all of A's turn (taken over, it would find only the system prompt), and B's next
    turn all of B's."""
    model = _model(preset)
    batch = DecodeBatch(model, max_rows=1, spare_rows=1)
    system = _ids(10, 80)
    a = Row(system + _ids(5, 81))
    batch.add(a)
    _finish(batch, a, 4)
    b = Row(system + _ids(6, 82))
    batch.add(b)
    batch.step()
    assert b.reused == len(system) and batch.parked == {1: a.ids[:-1]}
    assert_batch_holds(batch, preset)
    _finish(batch, b, 4)
    follow_a, follow_b = Row(a.ids + _ids(3, 83)), Row(b.ids + _ids(2, 84))
    for r in (follow_a, follow_b):
        batch.add(r)
    batch.step()
    assert_batch_holds(batch, preset)
    for r in (follow_a, follow_b):
        _finish(batch, r, 3)
        assert_batch_holds(batch, preset)
    assert (follow_a.reused, follow_b.reused) == (len(a.ids) - 1, len(b.ids) - 1)
    for r in (b, follow_a, follow_b):
        assert r.generated == _alone(r, preset)
    batch.close()


def test_a_next_turn_whose_answer_came_back_as_other_tokens_still_takes_the_row_over():
    """A conversation's next turn holds the last answer as text, encoded again: the tokens can differ from those
    the model produced. It repeats the last request's whole prompt, so it is that conversation's turn and takes
    the row over, reading from the answer on; no stale copy of the old turn is left parked."""
    model = _model()
    batch = DecodeBatch(model, max_rows=1, spare_rows=1)
    a = Row(_ids(12, 90))
    batch.add(a)
    _finish(batch, a, 5)
    answer_again = [(t + 1) % 512 for t in a.generated]  # the answer's text, encoded into other tokens
    b = Row(a.ids[:a.n_prompt] + answer_again + _ids(3, 91))
    batch.add(b)
    batch.step()
    assert b.reused == a.n_prompt and batch.parked == {}
    assert_batch_holds(batch)
    _finish(batch, b, 3)
    assert b.generated == _alone(b)
    batch.close()


def test_spare_rows_are_for_parking_only():
    assert DecodeBatch(_model(), max_rows=2, spare_rows=3, reuse=False).cache_rows == 2
    with pytest.raises(gen.UserError, match="spare cache rows"):
        DecodeBatch(_model(), max_rows=2, spare_rows=-1)


def test_parked_rows_survive_the_cache_growing():
    model = _model()
    batch = DecodeBatch(model, max_rows=2, max_len=16)
    a = Row(_ids(10, 60))
    batch.add(a)
    _finish(batch, a, 4)
    long = Row(_ids(40, 61))  # needs 40+ positions: the cache doubles past 16, every row's entries kept
    batch.add(long)
    batch.step()
    assert batch.model.blocks[0].attn.kv_cache.max_len >= 40 and 1 in batch.parked
    assert_batch_holds(batch)
    b = Row(a.ids + _ids(3, 62))
    batch.add(b)
    _finish(batch, b, 4)
    assert b.reused == len(a.ids) - 1 and b.generated == _alone(b)
    batch.close()


def test_no_reuse_when_turned_off():
    model = _model()
    batch = DecodeBatch(model, max_rows=2, reuse=False)
    a = Row(_ids(12, 70))
    batch.add(a)
    _finish(batch, a, 3)
    b = Row(a.ids + _ids(2, 71))
    batch.add(b)
    _finish(batch, b, 3)
    assert batch.parked == {} and b.reused == 0
    assert b.generated == _alone(b)
    batch.close()


def test_sliding_window_rows_are_reused_within_the_window_only():
    preset = "gemma3-micro"
    model = _model(preset)
    batch = DecodeBatch(model, max_rows=3)
    short, long = Row(_ids(10, 72)), Row(_ids(20, 73))
    batch.add(short)
    batch.add(long)
    _finish(batch, short, 5)  # 14 positions held: within the 24-position window
    _finish(batch, long, 8)  # 27 positions held: the ring wrapped
    assert_batch_holds(batch, preset)
    departs = Row(long.ids[:15] + _ids(3, 76))  # shares 15 of the 27 the long row held, which its ring lost
    batch.add(departs)
    batch.step()
    assert_batch_holds(batch, preset)
    _finish(batch, departs, 4)
    assert departs.reused == 0 and departs.generated == _alone(departs, preset)
    # One repeats all the short row held, one all the long one did (its ring holds the window before that).
    rows = [Row(short.ids + _ids(3, 74)), Row(long.ids + _ids(3, 75))]
    for r in rows:
        batch.add(r)
    batch.step()
    assert_batch_holds(batch, preset)
    for r in rows:
        _finish(batch, r, 4)
    assert [r.reused for r in rows] == [len(short.ids) - 1, len(long.ids) - 1]
    for r in rows:
        assert r.generated == _alone(r, preset)
    batch.close()
