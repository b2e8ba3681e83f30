import dataclasses

import pytest
import torch

from pyrl.config import PolicyLossConfig


def test_defaults_match_api():
    c = PolicyLossConfig()
    expected = dict(loss_type="ppo", eps_low=0.2, eps_high=0.2, delta=None, clip_ratio_c=None,
                    ratio_level="token", kl_type=None, beta=0.0, entropy_coef=0.0, top_entropy_rho=1.0,
                    agg="token-mean", max_completion_length=None, num_items_in_batch=None,
                    temperature=1.0, is_level=None, is_mode="truncate", is_cap=2.0, is_min=None,
                    tau_pos=1.0, tau_neg=1.05, use_bias_correction_kl=False,
                    # loss-owned fields added with clip_cov/kl_cov: None means verl's default
                    clip_cov_ratio=None, clip_cov_lb=None, clip_cov_ub=None, kl_cov_ratio=None, ppo_kl_coef=None,
                    mastered_token_prob=None, lp_reg_min_p=None, lp_reg_coef=1.0, lp_reg_rho=0.01,
                    # pacs / disco (docs/formulas.md §3.11, §3.12)
                    group_size=None, pacs_beta=1.0, disco_score="l_ratio", disco_tau=None, disco_delta=1e-4,
                    disco_beta=1e3,
                    # the sampler (docs/formulas.md §1.1)
                    top_k=None, top_p=None, min_p=None, sampler_order="hf")
    assert {f.name: getattr(c, f.name) for f in dataclasses.fields(c)} == expected


def test_frozen():
    c = PolicyLossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.beta = 1.0
    assert dataclasses.replace(c, beta=0.5).beta == 0.5


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import pyrl.config as mod

    tree = ast.parse(inspect.getsource(mod))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PolicyLossConfig")
    documented = set()
    for prev, node in zip(cls.body, cls.body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            documented.add(prev.target.id)
    assert documented == {f.name for f in dataclasses.fields(PolicyLossConfig)}


@pytest.mark.parametrize("kwargs", [
    dict(loss_type="gspo"), dict(loss_type="cispo", eps_low=None, eps_high=4.0), dict(loss_type="sapo"),
    dict(loss_type="reinforce"), dict(delta=4.0), dict(clip_ratio_c=3.0), dict(loss_type="gspo", delta=1.5),
    dict(ratio_level="sequence"), dict(kl_type="k1"), dict(kl_type="full", beta=0.1), dict(beta=0.04),
    dict(use_bias_correction_kl=True, beta=0.1), dict(entropy_coef=-0.01), dict(top_entropy_rho=0.2),
    dict(agg="seq-mean-token-sum-norm", max_completion_length=128), dict(num_items_in_batch=17),
    dict(num_items_in_batch=17.5), dict(num_items_in_batch=torch.tensor(17)), dict(temperature=0.7),
    dict(is_level="token"), dict(is_level="sequence", is_mode="mask", is_min=0.5, is_cap=2.0),
    dict(tau_pos=0.5, tau_neg=2), dict(eps_low=0, eps_high=0), dict(max_completion_length=5),
])
def test_valid_configs(kwargs):
    PolicyLossConfig(**kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(loss_type="grpo"), ValueError,
     r"loss_type must be one of 'ppo', 'gspo', 'cispo', 'sapo', 'reinforce'.*'grpo'"),
    (dict(loss_type=3), TypeError, r"loss_type must be one of"),
    (dict(eps_low=None), ValueError, r"eps_low may be None only for loss_type='cispo'"),
    (dict(eps_low=-0.1), ValueError, r"eps_low must be >= 0, got -0.1"),
    (dict(eps_low="0.2"), TypeError, r"eps_low must be a finite number or None, got str"),
    (dict(eps_high=-1), ValueError, r"PolicyLossConfig.eps_high must be >= 0, got -1"),
    (dict(eps_high=None), TypeError, r"eps_high must be a finite number, got NoneType"),
    (dict(eps_high=float("inf")), ValueError, r"eps_high must be finite"),
    (dict(eps_high=True), TypeError, r"eps_high must be a finite number"),
    (dict(delta=1.0), ValueError, r"delta must be > 1"),
    (dict(delta=4.0, loss_type="sapo"), ValueError, r"delta applies to loss_type 'ppo' or 'gspo' only"),
    (dict(clip_ratio_c=0.5), ValueError, r"clip_ratio_c must be > 1"),
    (dict(clip_ratio_c=3.0, loss_type="cispo"), ValueError, r"clip_ratio_c applies to loss_type"),
    (dict(ratio_level="seq"), ValueError, r"ratio_level must be one of 'token', 'sequence', got 'seq'"),
    (dict(kl_type="low_var_kl"), ValueError, r"kl_type must be one of None, 'k1', 'k2', 'k3', 'abs', 'k1\+', 'k2\+', 'k3\+', 'abs\+', 'full'"),
    (dict(beta=-0.1), ValueError, r"beta must be >= 0"),
    (dict(beta=float("nan")), ValueError, r"beta must be finite"),
    (dict(use_bias_correction_kl=1), TypeError, r"use_bias_correction_kl must be a bool"),
    (dict(entropy_coef=None), TypeError, r"entropy_coef must be a finite number"),
    (dict(top_entropy_rho=0.0), ValueError, r"top_entropy_rho must be in \(0, 1\]"),
    (dict(top_entropy_rho=1.5), ValueError, r"top_entropy_rho must be in \(0, 1\]"),
    (dict(agg="mean"), ValueError, r"agg must be one of 'token-mean', 'seq-mean-token-mean'"),
    (dict(max_completion_length=0), ValueError, r"max_completion_length must be > 0"),
    (dict(max_completion_length=10.0), TypeError, r"max_completion_length must be an int"),
    (dict(num_items_in_batch=0), ValueError, r"num_items_in_batch must be a finite number > 0"),
    (dict(num_items_in_batch="8"), TypeError, r"num_items_in_batch must be a number > 0"),
    (dict(num_items_in_batch=torch.tensor([8])), ValueError, r"num_items_in_batch must be a 0-dim tensor"),
    (dict(num_items_in_batch=torch.tensor(True)), TypeError, r"num_items_in_batch must be a real"),
    (dict(num_items_in_batch=8, agg="seq-mean-token-mean"), ValueError, r"num_items_in_batch .*agg='token-mean' only"),
    (dict(temperature=0), ValueError, r"temperature must be > 0"),
    (dict(is_level="batch"), ValueError, r"is_level must be one of None, 'token', 'sequence'"),
    (dict(is_mode="clip"), ValueError, r"is_mode must be one of 'truncate', 'mask'"),
    (dict(is_cap=0), ValueError, r"is_cap must be > 0"),
    (dict(is_min=0.5), ValueError, r"is_min applies to is_mode='mask' only"),
    (dict(is_mode="mask", is_min=2.0, is_cap=2.0), ValueError, r"is_min must be >= 0 and < is_cap"),
    (dict(is_mode="mask", is_min=-0.1), ValueError, r"is_min must be >= 0"),
    (dict(tau_pos=0), ValueError, r"tau_pos must be > 0"),
    (dict(tau_neg=-1.0), ValueError, r"tau_neg must be > 0"),
])
def test_invalid_configs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PolicyLossConfig(**kwargs)


def test_effective_properties():
    assert PolicyLossConfig().effective_kl_type is None
    assert PolicyLossConfig(beta=0.1).effective_kl_type == "k3"  # the TRL/Liger estimator
    assert PolicyLossConfig(beta=0.1, kl_type="k1").effective_kl_type == "k1"
    assert PolicyLossConfig(kl_type="k2").effective_kl_type == "k2"
    assert PolicyLossConfig(loss_type="gspo").effective_ratio_level == "sequence"
    assert PolicyLossConfig(ratio_level="sequence").effective_ratio_level == "sequence"
    assert PolicyLossConfig().effective_ratio_level == "token"


def test_registered_loss_type_is_accepted():
    from pyrl import register_policy_loss, unregister_policy_loss

    with pytest.raises(ValueError, match="loss_type"):
        PolicyLossConfig(loss_type="my_test_loss_cfg")

    @register_policy_loss("my_test_loss_cfg")
    def _mine(logp, ratio, advantages, config):
        return -advantages * ratio, None

    try:
        assert PolicyLossConfig(loss_type="my_test_loss_cfg").loss_type == "my_test_loss_cfg"
    finally:
        unregister_policy_loss("my_test_loss_cfg")
