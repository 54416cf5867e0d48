"""ExampleBatches: seeded epochs, repeatable evaluation, exact resume."""

import pytest

from llmscratch.train.batches import ExampleBatches


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
