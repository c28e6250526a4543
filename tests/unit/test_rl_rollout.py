"""The rollout layout and the prompt stream of PPO (leantune.rl.rollout), against hand-made cases
and a plain per-row log-softmax."""

from __future__ import annotations

import pytest
import torch

from leantune.data import load_tokenizer
from leantune.rl.rollout import Prompt, PromptStream, forward_policy, layout
from tests.helpers import tiny_llama


def test_layout_right_pads_and_indexes_the_response_tokens():
    tok = load_tokenizer(None)
    eos = tok.eos_token_id
    prompts = [Prompt([1, 10, 11], "a"), Prompt([1, 12], "b")]
    responses = [[20, 21, eos], [22, 23, 24, 25]]  # the second hit max_new_tokens
    ro = layout(tok, prompts, responses, [False, True], torch.device("cpu"))
    assert ro.tokens.tolist() == [[1, 10, 11, 20, 21, eos], [1, 12, 22, 23, 24, 25]]
    assert ro.attention_mask.tolist() == [[1] * 6, [1] * 6]
    assert ro.response.tolist() == [[20, 21, eos, 0], [22, 23, 24, 25]]
    assert ro.mask.tolist() == [[True, True, True, False], [True] * 4]
    # logits at position i predict token i + 1: response token t of row b sits at P_b + t
    for b, p in enumerate(prompts):
        for t in range(int(ro.mask[b].sum())):
            assert ro.index[b, t] == len(p.ids) - 1 + t
            assert ro.tokens[b, ro.index[b, t] + 1] == ro.response[b, t]
    assert ro.truncated.tolist() == [False, True]
    assert ro.completions[0] == tok.decode([20, 21])  # eos dropped from the text
    with pytest.raises(ValueError, match="at least one token"):
        layout(tok, prompts, [[20], []], [False, False], torch.device("cpu"))


def test_forward_policy_log_probs_match_a_per_row_oracle():
    model = tiny_llama(seed=1).eval()
    tok = load_tokenizer(None)
    prompts = [Prompt([1, 5, 6, 7], "a"), Prompt([1, 8], "b")]
    responses = [[9, 10], [11, 12, 13, 2]]
    ro = layout(tok, prompts, responses, [True, False], torch.device("cpu"))
    batch = {
        "tokens": ro.tokens,
        "attention_mask": ro.attention_mask,
        "index": ro.index,
        "response": ro.response,
    }
    with torch.no_grad():
        logp, ent, _ = forward_policy(model, batch, 0.5, entropy=True)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            seq = torch.tensor([p.ids + r])
            logits = model(input_ids=seq).logits[0] / 0.5  # each row alone, unpadded
            ref = logits.log_softmax(-1)
            for t, token in enumerate(r):
                pos = len(p.ids) - 1 + t
                assert logp[b, t].item() == pytest.approx(ref[pos, token].item(), abs=1e-5)
                probs = ref[pos].exp()
                assert ent[b, t].item() == pytest.approx(-(probs * ref[pos]).sum().item(), abs=1e-5)


def test_prompt_stream_is_seeded_covers_each_epoch_and_resumes():
    prompts = [Prompt([1, i], str(i)) for i in range(10)]
    a = PromptStream(prompts, 4, seed=3)
    first = [p.text for _ in range(5) for p in a.next_batch()]  # 20 = two epochs
    assert sorted(first[:10]) == sorted(str(i) for i in range(10))
    assert sorted(first[10:]) == sorted(str(i) for i in range(10))
    assert first[:10] != first[10:]  # reshuffled per epoch
    b = PromptStream(prompts, 4, seed=3)
    b.next_batch()
    state = b.state_dict()
    c = PromptStream(prompts, 4, seed=3)
    c.load_state_dict(state)
    assert [p.text for p in c.next_batch()] == first[4:8]
    with pytest.raises(ValueError, match="had 10 prompts"):
        PromptStream(prompts[:5], 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="no prompts"):
        PromptStream([], 4, seed=0)
