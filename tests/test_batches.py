"""ExampleBatches: seeded epochs, repeatable evaluation, exact resume."""

import pytest

from llmscratch.train.batches import ExampleBatches, TokenBatches


def make(n=10, bs=3, seed=0, **kw):
    return ExampleBatches(list(range(n)), list(range(100, 105)), collate=list, batch_size=bs, seed=seed, **kw)


def test_an_epoch_visits_each_example_at_most_once_and_reshuffles():
    b = make()
    assert b.batches_per_epoch == 3
    epoch0 = [x for _ in range(3) for x in b.next("train")]
    assert len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))
    epoch1 = [x for _ in range(3) for x in b.next("train")]
    assert b.epoch == 1 and epoch1 != epoch0


def test_keep_last_batch_covers_every_example():
    b = make(drop_last=False)
    assert b.batches_per_epoch == 4
    seen = [x for _ in range(4) for x in b.next("train")]
    assert sorted(seen) == list(range(10))


def test_eval_streams_repeat_after_reset_and_wrap():
    b = make()
    first = [b.next("eval_val") for _ in range(3)]
    assert first == [[100, 101, 102], [103, 104], [100, 101, 102]]
    b.reset_eval()
    assert b.next("eval_val") == first[0]
    assert b.next("eval_train") == [0, 1, 2]


def test_resume_continues_with_the_next_batch():
    a = make(seed=3)
    for _ in range(4):
        a.next("train")
    state = a.state_dict()
    expected = [a.next("train") for _ in range(5)]
    b = make(seed=3)
    b.load_state_dict(state)
    assert [b.next("train") for _ in range(5)] == expected


def test_too_few_examples_is_an_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        ExampleBatches([1, 2], [], collate=list, batch_size=3)


# --- TokenBatches: random windows from tokens in memory -------------------------------------------------------
def test_token_windows_are_next_token_pairs_from_the_tokens():
    import torch

    tokens = torch.arange(1000) * 7 % 991  # distinct values, so a window's position is readable from its tokens
    batches = TokenBatches(tokens, batch_size=5, context_length=16, seed=3)
    x, y = batches.next("train")
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    for row_x, row_y in zip(x, y):
        start = int((tokens == row_x[0]).nonzero()[0])
        assert torch.equal(row_x, tokens[start:start + 16]) and torch.equal(row_y, tokens[start + 1:start + 17])


def test_token_batches_resume_with_the_next_batch_and_evaluations_repeat():
    import torch

    tokens = torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0))
    val = torch.randint(0, 50, (100,), generator=torch.Generator().manual_seed(1))
    a = TokenBatches(tokens, 4, 8, seed=0, val=val)
    a.next("train")
    saved = a.state_dict()
    expected = a.next("train")
    b = TokenBatches(tokens, 4, 8, seed=0, val=val)
    b.load_state_dict(saved)
    assert all(torch.equal(p, q) for p, q in zip(b.next("train"), expected))
    first = [a.next("eval_val") for _ in range(2)]
    a.reset_eval()
    again = [a.next("eval_val") for _ in range(2)]
    assert all(torch.equal(p, q) for f, g in zip(first, again) for p, q in zip(f, g))
    assert not torch.equal(first[0][0], first[1][0])  # the evaluation stream moves on between batches
    assert set(a.next("eval_val")[0].flatten().tolist()) <= set(val.tolist())  # eval_val reads `val`


def test_token_batches_refuse_too_few_tokens():
    import torch

    with pytest.raises(ValueError, match="fewer than one window of 17"):
        TokenBatches(torch.arange(16), 2, 16)
    with pytest.raises(ValueError, match="val has 5 tokens"):
        TokenBatches(torch.arange(100), 2, 16, val=torch.arange(5))
