"""build_optimizer's names and messages against literal expectations (survivors of mutmut)."""

from __future__ import annotations

import re

import pytest
import torch

from leantune.optim import InBackward, build_optimizer

KNOWN = (
    "adalomo, lomo, adamw, sgd, adafactor, lion, adan, sophia, adamw_in_backward, sgd_in_backward, "
    "adafactor_in_backward, lion_in_backward, adan_in_backward, galore, apollo, adam_mini, badam, "
    "adamw8bit, adamw4bit"
)


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


@pytest.mark.parametrize("name", ["AdamW-In-Backward", "adamw-in_backward", "ADAMW_IN_BACKWARD"])
def test_hyphens_and_case_in_a_name_are_ignored(name):
    opt = build_optimizer(name, _linear(), lr=0.01)
    assert type(opt) is InBackward and opt.optimizer_cls is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 0.01


def test_an_unknown_name_with_no_close_match_lists_every_known_name_without_a_hint():
    with pytest.raises(ValueError) as err:
        build_optimizer("zzqqxx", _linear())
    assert str(err.value) == f"Unknown optimizer 'zzqqxx'. Known: {KNOWN}"


def test_an_unknown_name_with_a_close_match_suggests_it_and_lists_every_known_name():
    with pytest.raises(ValueError) as err:
        build_optimizer("lionn", _linear())
    assert str(err.value) == f"Unknown optimizer 'lionn'. Did you mean 'lion'? Known: {KNOWN}"


def test_engine_options_for_an_ordinary_optimizer_are_listed_sorted_and_comma_separated():
    with pytest.raises(ValueError) as err:
        build_optimizer("adamw", _linear(), seed=1, clip_grad_norm=1.0, lr=0.1)
    assert str(err.value) == (
        "adamw is not fused into backward: pass clip_grad_norm, seed to leantune.optim.Stepper "
        "(the trainer does this for you)"
    )


@pytest.mark.parametrize("name", ["adamw", "adamw_in_backward"])
def test_an_unknown_keyword_becomes_a_value_error_naming_the_optimizer(name):
    with pytest.raises(ValueError, match=f"^optimizer '{name}': .*got an unexpected keyword argument 'lrr'"):
        build_optimizer(name, _linear(), lrr=0.1)


@pytest.mark.parametrize("name", ["adamw", "adamw_in_backward"])
def test_a_type_error_that_is_not_about_a_keyword_stays_a_type_error(name):
    """A learning rate of the wrong type fails inside torch's comparison: not a keyword problem."""
    with pytest.raises(TypeError, match=re.escape("'<=' not supported")):
        build_optimizer(name, _linear(), lr="0.1")


def test_a_type_error_other_than_an_unknown_option_is_raised_as_it_is():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="not subscriptable"):
        build_optimizer("adamw", model, betas=1.0)
