"""Padding-free packing (leantune.data.packing): every sample once, rows within max_length, the
loss of packed batches equal to the unpacked one, and no attention across samples, on several
model families."""

from __future__ import annotations

import math
import random

import pytest
import torch

from leantune.data import IGNORE_INDEX, Sample, collate, pack_samples
from leantune.data.packing import packing_is_exact, unpack_rows
from tests.families import FAMILIES


def make_samples(lengths, seed=0, vocab=50):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(4, vocab) for _ in range(n)]
        prompt = rng.randrange(1, n)  # the first `prompt` tokens are masked, like a prompt
        out.append(Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def split_row(row: Sample) -> list[tuple[list[int], list[int]]]:
    """The samples of a packed row, cut where the positions restart (an independent reading)."""
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
    return [(row.input_ids[a:b], row.labels[a:b]) for a, b in zip(starts, starts[1:])]


def test_every_sample_lands_once_with_its_own_positions_and_a_masked_first_label():
    lengths = [random.Random(1).randint(2, 40) for _ in range(300)]
    samples = make_samples(lengths)
    rows, stats = pack_samples(samples, 64, seed=3)
    assert all(len(r.input_ids) <= 64 for r in rows)
    pieces = [p for r in rows for p in split_row(r)]
    assert sorted(tuple(ids) for ids, _ in pieces) == sorted(tuple(s.input_ids) for s in samples)
    by_ids = {tuple(s.input_ids): s for s in samples}
    for ids, labels in pieces:
        assert labels == [IGNORE_INDEX, *by_ids[tuple(ids)].labels[1:]]
    for r in rows:
        assert all(b == a + 1 or b == 0 for a, b in zip(r.position_ids, r.position_ids[1:]))
    assert stats.samples == 300 and stats.rows == len(rows) and stats.tokens == sum(lengths)
    assert stats.fill == pytest.approx(sum(lengths) / (len(rows) * 64))
    assert len(rows) >= math.ceil(sum(lengths) / 64)
    # best fit: no two rows could have been merged (at most one row is half empty or less)
    sizes = sorted(len(r.input_ids) for r in rows)
    assert sizes[0] + sizes[1] > 64
    assert stats.summary() == f"300 samples packed into {len(rows)} sequences of 64 ({stats.fill:.0%} filled)"


def test_unpacking_gives_the_samples_back():
    samples = make_samples([5, 9, 30, 12, 7, 20, 33, 3])
    rows, _ = pack_samples(samples, 40, seed=1)
    back = unpack_rows(rows)
    assert sorted(s.input_ids for s in back) == sorted(s.input_ids for s in samples)
    assert all(s.position_ids is None for s in back)
    assert unpack_rows(samples) == samples  # unpacked samples pass through


def test_packing_is_deterministic_per_seed_and_refuses_an_overlong_sample():
    samples = make_samples([5, 9, 30, 12, 7, 20, 33, 3])
    first, _ = pack_samples(samples, 40, seed=1)
    again, _ = pack_samples(samples, 40, seed=1)
    other, _ = pack_samples(samples, 40, seed=2)
    assert [r.input_ids for r in first] == [r.input_ids for r in again]
    assert [r.input_ids for r in first] != [r.input_ids for r in other]
    with pytest.raises(ValueError, match="sample 2 has 30 tokens, more than max_length=20"):
        pack_samples(samples, 20)


def test_collate_gives_packed_rows_positions_and_their_padding_a_sequence_of_its_own():
    rows, _ = pack_samples(make_samples([3, 4, 6]), 8, seed=0)
    batch = collate(rows, pad_id=0)
    lengths = [len(r.input_ids) for r in rows]
    assert batch["attention_mask"].sum().item() == sum(lengths) == 13
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        assert batch["position_ids"][i, :n].tolist() == r.position_ids
        assert batch["position_ids"][i, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    assert "position_ids" not in collate(make_samples([3, 4]), pad_id=0)


# families whose transformers 5 code builds its attention mask without the position ids
SEE_ACROSS_SAMPLES = {"opt"}


def _model(family: str):
    from tests.families import tiny_model

    return tiny_model(family, vocab_size=50).eval()  # the family's default attention, no cache


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_loss_equals_unpacked_loss_and_samples_do_not_see_each_other(family):
    """On every family whose code hands the position ids to its attention mask; the others are
    found by ``packing_is_exact`` (the trainer then trains them unpacked)."""
    model = _model(family)
    samples = make_samples([7, 12, 5, 16, 9, 3, 11, 14], seed=4)
    rows, _ = pack_samples(samples, 32, seed=0)
    assert len(rows) < len(samples)
    unpacked = collate(samples, pad_id=0)
    packed = collate(rows, pad_id=0)
    del packed["attention_mask"]  # what the trainer passes: the positions delimit the samples
    exact = packing_is_exact(model, "cpu", 50)
    assert exact == (family not in SEE_ACROSS_SAMPLES)
    with torch.no_grad():
        want = model(**unpacked).loss
        got = model(**packed).loss
        if not exact:  # the probe is right: this family's packed loss is another one
            assert abs(got - want) > 1e-4
            return
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        # each sample's logits inside a row are its logits alone
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        for i, row in enumerate(rows):
            start = 0
            for ids, _ in split_row(row):
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                torch.testing.assert_close(logits[i, start : start + len(ids)], alone, rtol=1e-4, atol=1e-5)
                start += len(ids)
        # changing one sample's tokens changes nothing in the others of its row
        row0 = packed["input_ids"].clone()
        first_len = len(split_row(rows[0])[0][0])
        row0[0, :first_len] = (row0[0, :first_len] + 1) % 50
        changed = model(input_ids=row0, position_ids=packed["position_ids"]).logits
        torch.testing.assert_close(changed[0, first_len:], logits[0, first_len:], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(changed[0, :first_len], logits[0, :first_len])
