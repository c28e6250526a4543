"""The preference losses against closed forms (torchtune's DPO case, the papers' formulas in plain
Python floats) and the completion log-probs against the full logits."""

from __future__ import annotations

import math

import pytest
import torch

from leantune.loss import ChunkedLMLoss
from leantune.objectives import completion_logps, preference_loss
from leantune.optim import LOMO
from tests.helpers import tiny_llama

# torchtune's tests/torchtune/rlhf/loss/test_dpo_loss.py
PC, PR = [-0.5, -10.0, -1.0], [-0.1, -30.0, -21.0]
RC, RR = [-0.5, -10.1, -0.1], [-0.1, -20.1, -0.1]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_equals_torchtunes_closed_form():
    out = preference_loss("dpo", t(PC), t(PR), t(RC), t(RR), beta=0.1)
    torch.testing.assert_close(out.loss, -torch.nn.functional.logsigmoid(t([0.0, 1.0, 2.0])))
    torch.testing.assert_close(out.loss, t([0.6931, 0.3133, 0.1269]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, t([0.0, 0.01, -0.09]))
    torch.testing.assert_close(out.rejected_rewards, t([0.0, -0.99, -2.09]))
    torch.testing.assert_close(out.margins, t([0.0, 1.0, 2.0]))
    assert out.accuracy.tolist() == [0.0, 1.0, 1.0]


def test_dpo_with_label_smoothing():
    eps = 0.2
    out = preference_loss("dpo", t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=eps)
    want = [-(1 - eps) * logsig(h) - eps * logsig(-h) for h in (0.0, 1.0, 2.0)]
    torch.testing.assert_close(out.loss, t(want))


def test_a_policy_equal_to_its_reference_has_loss_ln2_for_every_dpo_pair():
    x, y = t([-3.0, -7.5]), t([-4.0, -1.0])
    out = preference_loss("dpo", x, y, x.clone(), y.clone(), beta=0.5)
    torch.testing.assert_close(out.loss, torch.full_like(x, math.log(2)))


def test_ipo_on_length_averaged_log_probs():
    nc, nr, beta = [2.0, 5.0, 4.0], [1.0, 10.0, 3.0], 0.25
    out = preference_loss(
        "ipo", t(PC), t(PR), t(RC), t(RR), chosen_tokens=t(nc), rejected_tokens=t(nr), beta=beta
    )
    want = []
    for pc, pr, rc, rr, a, b in zip(PC, PR, RC, RR, nc, nr):
        h = (pc / a - pr / b) - (rc / a - rr / b)
        want.append((h - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(out.loss, t(want))
    torch.testing.assert_close(out.chosen_rewards, beta * (t(PC) - t(RC)) / t(nc))


def test_simpo_needs_no_reference():
    nc, nr, beta, gamma = [2.0, 5.0, 4.0], [1.0, 10.0, 3.0], 2.0, 0.5
    out = preference_loss(
        "simpo", t(PC), t(PR), chosen_tokens=t(nc), rejected_tokens=t(nr), beta=beta, gamma=gamma
    )
    want = [-logsig(beta * (pc / a - pr / b) - gamma) for pc, pr, a, b in zip(PC, PR, nc, nr)]
    torch.testing.assert_close(out.loss, t(want))
    torch.testing.assert_close(out.rejected_rewards, beta * t(PR) / t(nr))


def test_orpo_is_the_chosen_nll_plus_the_odds_ratio_term():
    nc, nr, lam = [2.0, 5.0, 4.0], [1.0, 10.0, 3.0], 0.1
    # -0.05 per token: near zero, where log(1 - e^x) needs care
    pc_, pr_ = [-0.1, -10.0, -1.0], [-0.1, -30.0, -21.0]
    out = preference_loss("orpo", t(pc_), t(pr_), chosen_tokens=t(nc), rejected_tokens=t(nr), orpo_lambda=lam)
    want = []
    for pc, pr, a, b in zip(pc_, pr_, nc, nr):
        mc, mr = pc / a, pr / b
        odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
        want.append(-mc - lam * logsig(odds))
    torch.testing.assert_close(out.loss, t(want))
    torch.testing.assert_close(out.chosen_rewards, lam * t(pc_) / t(nc))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "kto"}, "unknown preference loss 'kto': choose from dpo, ipo, simpo, orpo"),
        ({"beta": 0.0}, r"beta must be a number in \(0.0, inf\)"),
        ({"beta": "0.1"}, r"beta must be a number in \(0.0, inf\), got '0.1'"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be a number in \[0.0, 0.5\)"),
        ({"ref": False}, "dpo needs the reference's log-probs"),
        ({"kind": "simpo"}, "simpo averages over the completion: give chosen_tokens"),
        ({"kind": "orpo", "tokens": [0.0, 1.0, 1.0]}, "orpo: a completion has no tokens"),
        ({"short": True}, "the inputs' shapes differ"),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind", "dpo")
    ref = kwargs.pop("ref", True)
    tokens = kwargs.pop("tokens", None)
    pr = t(PR[:2]) if kwargs.pop("short", False) else t(PR)
    extra = {"chosen_tokens": t(tokens), "rejected_tokens": t([1.0] * 3)} if tokens else {}
    with pytest.raises(ValueError, match=message):
        preference_loss(kind, t(PC), pr, t(RC) if ref else None, t(RR) if ref else None, **extra, **kwargs)


def _pairs(device, vocab=48):
    """Two chosen and two rejected sequences: prompts masked, one padded at the end."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 9:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {k: v.to(device) for k, v in {"input_ids": ids, "labels": labels, "attention_mask": mask}.items()}


def _manual_logps(model, batch):
    """Plain loop over the sequences and positions: the oracle for completion_logps."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    out, counts = [], []
    for b in range(logits.shape[0]):
        total, n = 0.0, 0
        for pos in range(logits.shape[1] - 1):
            y = int(batch["labels"][b, pos + 1])
            if y != -100:
                total = total + logits[b, pos].log_softmax(-1)[y]
                n += 1
        out.append(total)
        counts.append(n)
    return torch.stack(out), counts


@pytest.mark.parametrize("chunk", [None, 5])
def test_completion_logps_and_their_gradients_equal_a_plain_loop(chunk, device):
    model = tiny_llama(device=device)
    batch = _pairs(device)
    loss = ChunkedLMLoss(model, chunk) if chunk else None
    logps, tokens = completion_logps(model, batch, loss)
    ref, counts = _manual_logps(model, batch)
    assert tokens.tolist() == counts == [7, 4, 7, 7]  # labels 5..11 (row 1: 5..8), predicted from 4..
    torch.testing.assert_close(logps.double(), ref, rtol=1e-5, atol=1e-5)
    weights = torch.tensor([1.5, -0.5, 2.0, -3.0], device=device)
    ours = torch.autograd.grad((weights * logps).sum(), list(model.parameters()))
    theirs = torch.autograd.grad((weights.double() * ref).sum(), list(model.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)


def test_one_fused_dpo_step_with_the_chunked_loss_raises_the_margin(device):
    # The fused optimizer sees the head's gradient once, built by the chunked loss's backward with
    # each sequence's own DPO weight: one LOMO step moves the policy towards the chosen completions.
    model = tiny_llama(device=device)
    loss = ChunkedLMLoss(model, 4)
    batch = _pairs(device)
    with torch.no_grad():
        ref, _ = completion_logps(model, batch, loss)
    opt = LOMO(model, lr=0.5)

    def dpo():
        logps, _ = completion_logps(model, batch, loss)
        return preference_loss("dpo", logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)

    first = dpo()
    torch.testing.assert_close(first.loss, torch.full_like(first.loss, math.log(2)))
    assert opt.backward(first.loss.mean()).updated
    with torch.no_grad():
        after = dpo()
    assert bool((after.margins > 0).all()) and float(after.loss.mean()) < math.log(2)


def test_dpo_with_adalomo_learns_to_prefer_sorted_strings_from_the_library_pieces():
    # encode_preference -> collate_pairs (chosen and rejected in one forward) -> completion_logps
    # through the chunked loss -> preference_loss -> one fused AdaLomo update per step, with the
    # reference's log-probs computed once before training (no reference model kept).
    import random

    from leantune.data import build_byte_tokenizer, collate_pairs, encode_preference
    from leantune.data.formats import prepare_records
    from leantune.models import build_model
    from leantune.optim import AdaLomo

    tok = build_byte_tokenizer()
    rng = random.Random(0)
    records = []
    for _ in range(16):
        letters = rng.sample("abcdefgh", 4)
        shuffled = letters[:]
        while shuffled == sorted(letters):
            rng.shuffle(shuffled)
        records.append(
            {"prompt": "".join(letters), "chosen": "".join(sorted(letters)), "rejected": "".join(shuffled)}
        )
    where = [f"pairs:{i}" for i in range(len(records))]
    recs, _ = prepare_records(records, where)
    pairs, _ = encode_preference(recs, where, tok, max_length=64)
    batch = collate_pairs(pairs, tok.pad_token_id)
    n = len(pairs)
    model = build_model(preset="test", vocab_size=len(tok), seed=0)
    model.config.use_cache = False
    loss_fn = ChunkedLMLoss(model, 16)
    with torch.no_grad():
        ref, _ = completion_logps(model, batch, loss_fn)  # precomputed once
    opt = AdaLomo(model, lr=0.05)
    accuracy = []
    for _ in range(12):
        logps, _ = completion_logps(model, batch, loss_fn)
        out = preference_loss("dpo", logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1)
        accuracy.append(float(out.accuracy.mean()))
        opt.backward(out.loss.mean())
    assert accuracy[0] == 0.0  # policy == reference: no pair is preferred yet (equal rewards)
    assert accuracy[-1] >= 0.9, accuracy
