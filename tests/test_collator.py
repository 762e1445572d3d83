from __future__ import annotations

import pickle

import pytest
import torch
from transformers import DataCollatorWithPadding, default_data_collator

from seo_trainlog import TimedDataCollator
from seo_trainlog.watch.timing import CollateSums


def stack_lengths(features):
    return {"lengths": torch.tensor([len(f["input_ids"]) for f in features])}


@pytest.mark.parametrize("make_collator", [
    lambda tok: DataCollatorWithPadding(tok),
    lambda tok: default_data_collator,
    lambda tok: stack_lengths,
], ids=["with_padding", "default", "plain_function"])
def test_returns_exactly_what_the_wrapped_collator_returns(make_collator, tokenizer, tiny_dataset):
    inner = make_collator(tokenizer)
    features = [tiny_dataset[i] for i in range(4)]
    if inner is default_data_collator:  # needs equal lengths
        features = [{"input_ids": f["input_ids"][:2], "labels": f["labels"]} for f in features]
    sentinel = object()
    sums = CollateSums()

    expected = inner(features)
    timed = TimedDataCollator(inner)
    timed.attach(sums)
    got = timed(features)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key])
    assert sums.eval.drain() == {}
    stats = sums.train.drain()
    assert stats["collate_calls"] == 1 and stats["collate_samples"] == 4
    assert 0 < stats["collate_time_s"] < 5 and stats["collate_max_ms"] == stats["collate_mean_ms"]

    same = TimedDataCollator(lambda feats: sentinel)
    assert same(features) is sentinel


def test_pickles_with_the_wrapped_collator(tokenizer, tiny_dataset):
    wrapped = TimedDataCollator(DataCollatorWithPadding(tokenizer))
    copy = pickle.loads(pickle.dumps(wrapped))
    features = [tiny_dataset[i] for i in range(3)]
    assert torch.equal(copy(features)["input_ids"], wrapped(features)["input_ids"])
    assert copy.tokenizer.vocab == tokenizer.vocab  # attributes read through to the wrapped collator


def test_rejects_a_non_callable():
    with pytest.raises(TypeError, match="needs a callable collator, got int"):
        TimedDataCollator(3)


def test_exceptions_pass_through_unchanged():
    error = ValueError("bad feature")

    def broken(features):
        raise error

    with pytest.raises(ValueError) as info:
        TimedDataCollator(broken)([{}])
    assert info.value is error
