"""leantune.optim.competitors: what leantune does around the other packages' optimizers (which
tensors they get, which options are checked, the messages), and the config's refusals."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from leantune.config import ConfigError, load_config
from leantune.optim import Stepper, build_optimizer, is_competitor, is_fused, optimizer_names, resume_refusal
from leantune.optim.competitors import COMPETITORS, linear_weights
from tests.helpers import batch, loss_of, tiny_llama

NAMES = ("galore", "apollo", "adam_mini", "badam", "adamw8bit", "adamw4bit")


def test_every_competitor_is_listed_and_none_is_fused():
    assert set(COMPETITORS) == set(NAMES)
    assert set(NAMES) <= set(optimizer_names())
    for name in NAMES:
        assert is_competitor(name) and is_competitor(name.upper().replace("_", "-"))
        assert not is_fused(name)
    assert not any(is_competitor(n) for n in ("adalomo", "adamw", "adamw_in_backward", "lomo"))


def test_only_the_inexact_ones_are_refused_resumption():
    assert {n for n in NAMES if resume_refusal(n) is not None} == {"galore", "apollo", "badam"}
    assert resume_refusal("adalomo") is None and resume_refusal("adamw") is None


def test_linear_weights_are_the_decoder_linears_without_the_head():
    model = tiny_llama()
    got = {id(p) for p in linear_weights(model)}
    want = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")
    }
    assert got == want and len(want) == 2 * 7  # q k v o gate up down per layer
    assert id(model.lm_head.weight) not in got


def test_linear_weights_skip_frozen_and_tied_head():
    model = tiny_llama(tie=True)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    got = {id(p) for p in linear_weights(model)}
    assert id(model.model.layers[0].self_attn.q_proj.weight) not in got
    assert id(model.model.embed_tokens.weight) not in got and len(got) == 13


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_projected_optimizers_put_their_options_on_the_linears_only(name):
    model = tiny_llama()
    opt = build_optimizer(name, model, lr=1e-3, rank=4, update_proj_gap=3)
    rest, proj = opt.param_groups
    assert "rank" not in rest and proj["rank"] == 4 and proj["update_proj_gap"] == 3
    assert {id(p) for p in proj["params"]} == {id(p) for p in linear_weights(model)}
    n_all = sum(1 for p in model.parameters())
    assert len(rest["params"]) + len(proj["params"]) == n_all


def test_adam_mini_reads_the_heads_from_the_config_and_runs_as_one_process():
    model = tiny_llama()
    opt = build_optimizer("adam_mini", model, lr=1e-3)
    assert (opt.dim, opt.n_heads, opt.n_kv_heads, opt.world_size) == (32, 4, 2, 1)
    bare = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no config to read the heads from
    with pytest.raises(
        ValueError, match=r"adam_mini: the model's config has no dim: pass optim\.kwargs\.dim"
    ):
        build_optimizer("adam_mini", bare, lr=1e-3)


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_torchao_adamw_follows_torch_adamw_on_small_tensors(name):
    # torchao keeps tensors below its quantisation size in full precision: there its update must be
    # torch's AdamW with the same lr, betas, eps and weight decay (the options reach the package).
    a, b = tiny_llama(), tiny_llama()
    hp = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    ours = build_optimizer(name, a, **hp)
    ref = torch.optim.AdamW(b.parameters(), **hp)
    small = [i for i, p in enumerate(a.parameters()) if p.numel() < 4096]
    assert small
    for s in range(3):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            loss_of(model, batch(s)).backward()
            opt.step()
    pa, pb = list(a.parameters()), list(b.parameters())
    for i in small:
        torch.testing.assert_close(pa[i], pb[i], rtol=1e-5, atol=1e-6)


def test_badam_trains_one_block_and_switches():
    model = tiny_llama()
    opt = build_optimizer("badam", model, lr=1e-2, switch_block_every=2, switch_mode="ascending")
    stepper = Stepper(opt)
    blocks = []
    for s in range(7):
        active = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
        assert len(active) == 1 and all(
            n.startswith("model.layers.") for n, p in model.named_parameters() if p.requires_grad
        )
        blocks.append(active.pop())
        assert stepper.backward(loss_of(model, batch(s))).updated
    # badam switches after its first step, then every switch_block_every steps, in ascending order
    assert blocks == ["0", "1", "1", "0", "0", "1", "1"]


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("galore", {"rank": 0}, "galore: rank must be an integer >= 1, got 0"),
        ("galore", {"rank": "8"}, "galore: rank must be an integer >= 1, got '8'"),
        ("galore", {"update_proj_gap": 0}, "galore: update_proj_gap must be an integer >= 1, got 0"),
        ("apollo", {"rank": 1.5}, "apollo: rank must be an integer >= 1, got 1.5"),
        ("apollo", {"rank": True}, "apollo: rank must be an integer >= 1, got True"),
        ("galore", {"update_proj_gap": True}, "galore: update_proj_gap must be an integer >= 1, got True"),
        ("apollo", {"proj": "pca"}, "apollo: proj must be random or svd and scale_type channel or tensor"),
        ("apollo", {"scale_type": "row"}, "got 'random' and 'row'"),
        ("badam", {"switch_block_every": 0}, "badam: switch_block_every must be an integer >= 1, got 0"),
        ("badam", {"switch_block_every": True}, "switch_block_every must be an integer >= 1, got True"),
        ("badam", {"switch_mode": "zigzag"}, "badam: switch_mode must be random, descending, ascending"),
        ("adamw8bit", {"lr": 0.0}, "optimizer 'adamw8bit': lr must be > 0, got 0.0"),
        ("adam_mini", {"lr": -1e-3}, "optimizer 'adam_mini': lr must be > 0, got -0.001"),
        ("adamw8bit", {"lr": True}, "optimizer 'adamw8bit': lr must be > 0, got True"),
        ("galore", {"clip_grad_norm": 1.0}, "galore is not fused into backward: pass clip_grad_norm to"),
        ("adamw4bit", {"rounding": "stochastic"}, "pass rounding to leantune.optim.Stepper"),
        ("galore", {"no_such_option": 1}, "optimizer 'galore': "),
        ("adamw8bit", {"no_such_option": 1}, "optimizer 'adamw8bit': "),
    ],
)
def test_bad_options_name_the_culprit(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_optimizer(name, tiny_llama(), **{"lr": 1e-3, **kwargs})


@pytest.mark.parametrize("name", ["galore", "apollo", "adam_mini", "badam"])
def test_a_parameter_list_is_refused_where_the_model_is_needed(name):
    params = list(tiny_llama().parameters())
    with pytest.raises(ValueError, match=f"optimizer '{name}' needs the model"):
        build_optimizer(name, params, lr=1e-3)


def test_torchao_takes_a_parameter_list_and_only_trainable_ones_from_a_model():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    opt = build_optimizer("adamw8bit", model, lr=1e-3)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.lm_head.weight) not in held and len(held) == sum(
        p.requires_grad for p in model.parameters()
    )
    assert build_optimizer("adamw4bit", list(model.parameters()), lr=1e-3).param_groups


def test_a_missing_package_says_what_to_install(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == "galore_torch":
            raise ImportError("No module named 'galore_torch'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"needs the package 'galore-torch'.*pip install galore-torch.*"
                       r"leantune\[competitors\]"):  # fmt: skip
        build_optimizer("galore", tiny_llama(), lr=1e-3)


# ----------------------------------------------------------------------------------- config
def _cfg(*overrides):
    return load_config(None, ["model.preset=test", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.name=galore", "dist.strategy=ddp"], "optim.name=galore runs with dist.strategy=none only"),
        (["optim.name=adamw8bit", "dist.strategy=fsdp"], "optim.name=adamw8bit runs with dist.strategy=none"),
        (["optim.name=adam_mini", "peft.method=lora"], "peft.method=lora changes; use adamw, adamw8bit"),
        (["optim.name=apollo", "peft.method=lora"], "optim.name=apollo chooses which tensors"),
        (["optim.name=badam", "train.hft=true"], "optim.name=badam with train.hft"),
        (["optim.name=galore", "train.hft=true"], "optim.name=galore with train.hft"),
        (
            ["optim.name=galore", "optim.rounding=stochastic"],
            "optim.rounding=stochastic applies to optimizers",
        ),
        (["optim.name=adam_mini", "optim.kwargs={lr: 0.1}"], "optim.kwargs.lr is a setting of its own"),
    ],
)
def test_the_config_refuses_what_a_competitor_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _cfg(*overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.name=adamw8bit", "peft.method=lora"],
        ["optim.name=adamw4bit", "train.hft=true"],
        ["optim.name=GaLore", "optim.kwargs={rank: 8}"],
    ],
)
def test_the_config_accepts_what_a_competitor_can_do(overrides):
    _cfg(*overrides)


# ------------------------------------------------------------------- what the packages receive
def test_linear_weights_of_a_model_without_an_output_head():
    # a plain nn.Sequential has no get_output_embeddings: every Linear weight is projected, in order
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    assert [id(p) for p in linear_weights(model)] == [id(model[0].weight), id(model[2].weight)]


def test_a_weight_shared_by_two_linears_is_listed_once():
    first, second, third = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    second.weight = first.weight
    model = torch.nn.Sequential(first, second, third)
    assert [id(p) for p in linear_weights(model)] == [id(first.weight), id(third.weight)]


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_a_model_without_linear_layers_is_refused_with_what_is_needed(name):
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError) as err:
        build_optimizer(name, model, lr=1e-3)
    assert str(err.value) == "found no nn.Linear weights to project (GaLore/APOLLO need linear layers)"


def test_galore_defaults_are_the_papers():
    # GaLore paper / README: rank 128, the projector refreshed every 200 steps, scale 0.25
    opt = build_optimizer("galore", tiny_llama(), lr=1e-3)
    proj = opt.param_groups[1]
    assert {k: proj[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
    }


def test_apollo_defaults_are_its_readmes_and_the_options_reach_every_group():
    # APOLLO README (LLaMA pre-training): rank 256, random projection, channel-wise scaling, scale 1
    opt = build_optimizer("apollo", tiny_llama(), lr=0.02, betas=(0.8, 0.95), weight_decay=0.1)
    rest, proj = opt.param_groups
    assert {k: proj[k] for k in ("rank", "proj", "scale_type", "scale", "update_proj_gap", "proj_type")} == {
        "rank": 256,
        "proj": "random",
        "scale_type": "channel",
        "scale": 1.0,
        "update_proj_gap": 200,
        "proj_type": "std",
    }
    for group in (rest, proj):
        assert (group["lr"], group["betas"], group["weight_decay"]) == (0.02, (0.8, 0.95), 0.1)


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_the_smallest_rank_and_projector_gap_are_accepted(name):
    # rank 1 is APOLLO-Mini's; a gap of 1 re-projects every step
    opt = build_optimizer(name, tiny_llama(), lr=1e-3, rank=1, update_proj_gap=1)
    assert (opt.param_groups[1]["rank"], opt.param_groups[1]["update_proj_gap"]) == (1, 1)


@pytest.mark.parametrize(
    ("options", "want"),
    [({"proj": "svd"}, ("svd", "channel")), ({"scale_type": "tensor"}, ("random", "tensor"))],
)
def test_apollo_accepts_the_svd_projector_and_tensor_scaling(options, want):
    opt = build_optimizer("apollo", tiny_llama(), lr=1e-3, rank=1, **options)
    assert (opt.param_groups[1]["proj"], opt.param_groups[1]["scale_type"]) == want


def test_galore_does_not_show_its_adamw_deprecation_warning_unless_asked():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_optimizer("galore", tiny_llama(), lr=1e-3, rank=4)
    assert not [w for w in caught if "implementation of AdamW is deprecated" in str(w.message)]
    with pytest.warns(FutureWarning, match="This implementation of AdamW is deprecated"):
        build_optimizer("galore", tiny_llama(), lr=1e-3, rank=4, no_deprecation_warning=False)


def test_adam_mini_is_quiet_and_takes_betas_from_any_iterable(capsys):
    # betas from a config come as a list (or any iterable); adam_mini reads them as beta1, beta2
    model = tiny_llama()
    opt = build_optimizer("adam_mini", model, lr=1e-3, betas=iter([0.8, 0.95]))
    assert all((g["beta1"], g["beta2"]) == (0.8, 0.95) for g in opt.param_groups)
    opt.zero_grad()
    loss_of(model, batch(0)).backward()
    opt.step()
    assert capsys.readouterr().out == ""  # adam_mini prints every block it finds when verbose


@pytest.mark.parametrize(("name", "cls"), [("adamw8bit", "AdamW8bit"), ("adamw4bit", "AdamW4bit")])
def test_torchao_builders_pass_params_and_options_with_betas_as_a_tuple(name, cls):
    # through competitors._torchao itself (it runs at import, to fill COMPETITORS) and through the
    # registry: the torchao class gets exactly the parameters, the options and betas as a tuple
    import torchao.optim

    from leantune.optim import competitors

    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    for build in (competitors._torchao(name, cls), COMPETITORS[name].build):
        opt = build(params, {"lr": 0.02, "betas": [0.8, 0.95], "weight_decay": 0.1})
        assert type(opt) is getattr(torchao.optim, cls)
        (group,) = opt.param_groups
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (0.02, (0.8, 0.95), 0.1)
    opt = competitors._torchao(name, cls)(params, {"lr": 0.02})
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # torchao's default, untouched
