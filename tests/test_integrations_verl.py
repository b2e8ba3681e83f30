"""pyrl.integrations.verl without verl: the signature mapping against a transcription of verl 0.9.1's
policy losses and ``agg_loss``, lazy registration into a fake verl, and the fused-kernel drop-in.
When the real verl is importable, the losses are also compared with verl's own functions."""
import itertools
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass, field

import pytest
import torch

import pyrl
from pyrl.integrations import verl as pv


# ---------------------------------------------------------------------------------------------
# verl 0.9.1's semantics, transcribed for the test (verl/trainer/ppo/core_algos.py)
# ---------------------------------------------------------------------------------------------
def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    m = loss_mask.float()
    if loss_agg_mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * m).sum() / n * dp_size
    if loss_agg_mode == "token-sum":
        return (loss_mat * m).sum() * dp_size
    seq_count = m.sum(-1)
    nonempty = (seq_count > 0).float()
    gbs = nonempty.sum() if global_batch_size is None else global_batch_size
    if loss_agg_mode == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1) / (seq_count + 1e-8)
    else:
        per_seq = (loss_mat * m).sum(-1)
    loss = (per_seq * nonempty).sum() / gbs * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
    return loss


def verl_policy_loss(mode, old, logp, adv, mask, agg, config, weights=None):
    lo = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    hi = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    neg_kl = (logp - old).clamp(-20, 20)
    ratio = neg_kl.exp()
    if mode == "vanilla":
        pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - lo, 1 + hi)
        clip1 = torch.maximum(pg1, pg2)
        pg = torch.where(adv < 0, torch.minimum(-adv * config.clip_ratio_c, clip1), clip1)
    elif mode == "gspo":
        m = mask.float()
        seq = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        r = (logp - logp.detach() + seq.detach().unsqueeze(-1)).clamp(max=10.0).exp()
        pg = torch.maximum(-adv * r, -adv * r.clamp(1 - lo, 1 + hi))
    elif mode == "cispo":
        pg = -ratio.clamp(1 - lo, 1 + hi).detach() * adv * logp
    elif mode == "sapo":
        tau = torch.where(adv > 0, torch.tensor(config.tau_pos, dtype=adv.dtype), torch.tensor(config.tau_neg, dtype=adv.dtype))
        pg = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
        agg = "seq-mean-token-mean"
    if weights is not None:
        pg = pg * weights
    return verl_agg_loss(pg, mask, agg, **config.global_batch_info)


@dataclass
class FakeActorConfig:  # the fields of verl's ActorConfig the policy losses read
    clip_ratio: float = 0.2
    clip_ratio_low: float = None
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    global_batch_info: dict = field(default_factory=dict)


def _batch(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    adv[0] = -2.0  # a negative advantage with large ratios exercises dual-clip
    old[0, :3] = logp.detach()[0, :3] - 1.5
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return old, logp, adv, mask, weights


AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GLOBAL_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9, "loss_scale_factor": 16}]


@pytest.mark.parametrize("mode", ["vanilla", "gspo", "cispo", "sapo"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFOS)))
def test_loss_matches_verl_semantics(mode, agg, info):
    old, logp, adv, mask, weights = _batch()
    config = FakeActorConfig(global_batch_info=dict(GLOBAL_INFOS[info]))
    name = "pyrl" if mode == "vanilla" else f"pyrl_{mode}"
    for w in (None, weights):
        ours, metrics = pv.compute_policy_loss(old, logp, adv, mask, agg, config, w, loss_mode=name)
        theirs = verl_policy_loss(mode, old, logp, adv, mask, agg, config, w)
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-7, atol=1e-10)
        g_ours, = torch.autograd.grad(ours, logp)
        g_theirs, = torch.autograd.grad(theirs, logp)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-7, atol=1e-10)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(isinstance(v, float) for v in metrics.values())


def test_metrics_follow_verl():
    old, logp, adv, mask, _ = _batch()
    config = FakeActorConfig()
    _, metrics = pv.compute_policy_loss(old, logp, adv, mask, "token-mean", config)
    m = mask.double()
    ppo_kl = ((old - logp.detach()) * m).sum() / m.sum()
    assert metrics["actor/ppo_kl"] == pytest.approx(float(ppo_kl))
    r = (logp.detach() - old).exp()
    lo, hi = 0.8, 1.28
    clip1 = torch.maximum(-adv * r, -adv * r.clamp(lo, hi))
    lower = ((clip1 > -adv * 3.0) & (adv < 0) & mask).double().sum() / m.sum()
    assert lower > 0 and metrics["actor/pg_clipfrac_lower"] == pytest.approx(float(lower))
    region = (((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))) & mask
    assert metrics["actor/pg_clipfrac"] == pytest.approx(float((region.double().sum()) / m.sum() + lower))


def test_dict_config_and_errors():
    old, logp, adv, mask, _ = _batch()
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None, "global_batch_info": {"dp_size": 2}}
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        pv.compute_policy_loss(old, logp, adv, mask, "token-mean", cfg)
    with pytest.raises(ValueError, match="global_batch_size is required"):
        pv.compute_policy_loss(old, logp, adv, mask, "seq-mean-token-mean", cfg)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        pv.compute_policy_loss(old, logp, adv, mask, "sum", {})
    loss, _ = pv.compute_policy_loss(old, logp, adv, mask, "token-mean", {})  # verl's defaults
    ref = verl_policy_loss("vanilla", old, logp, adv, mask, "token-mean",
                           FakeActorConfig(clip_ratio_high=None))
    torch.testing.assert_close(loss.double(), ref)


def _fake_core_algos():
    mod = types.ModuleType("fake_core_algos")
    mod.POLICY_LOSS_REGISTRY = {}

    def register_policy_loss(name):
        def deco(fn):
            mod.POLICY_LOSS_REGISTRY[name] = fn
            return fn
        return deco

    mod.register_policy_loss = register_policy_loss
    return mod


def test_register_into_loaded_core_algos(monkeypatch):
    core = _fake_core_algos()
    monkeypatch.setitem(sys.modules, pv.VERL_CORE_ALGOS, core)
    pv._install()
    assert set(core.POLICY_LOSS_REGISTRY) == set(pv.LOSS_MODES)
    old, logp, adv, mask, _ = _batch()
    fn = core.POLICY_LOSS_REGISTRY["pyrl_sapo"]
    # verl calls it with keywords
    loss, _ = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
                 config=FakeActorConfig(), rollout_is_weights=None)
    ref = verl_policy_loss("sapo", old, logp, adv, mask, "token-mean", FakeActorConfig())
    torch.testing.assert_close(loss.double(), ref)


FAKE_VERL = {
    "verl/__init__.py": "",
    "verl/trainer/__init__.py": "",
    "verl/trainer/ppo/__init__.py": "",
    "verl/trainer/ppo/core_algos.py": """
        POLICY_LOSS_REGISTRY = {}
        def register_policy_loss(name):
            def deco(fn):
                POLICY_LOSS_REGISTRY[name] = fn
                return fn
            return deco
        @register_policy_loss("vanilla")
        def vanilla(*args, **kwargs):
            pass
    """,
    "verl/utils/__init__.py": "",
    "verl/utils/kernel/__init__.py": "",
    "verl/utils/kernel/linear_cross_entropy.py": """
        def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
            raise RuntimeError("verl's kernel")
    """,
    "verl/models/__init__.py": "",
    "verl/models/fused_forward.py": "from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy\n",
}


def test_lazy_registration_when_verl_is_imported_later(tmp_path):
    for path, text in FAKE_VERL.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    script = textwrap.dedent("""
        import sys
        import pyrl.integrations.verl as pv
        assert "verl" not in sys.modules, "importing pyrl must not import verl"
        from verl.trainer.ppo import core_algos
        assert sorted(core_algos.POLICY_LOSS_REGISTRY) == sorted(["vanilla", *pv.LOSS_MODES]), core_algos.POLICY_LOSS_REGISTRY
        import verl.models.fused_forward as ff
        import verl.utils.kernel.linear_cross_entropy as k
        patched = pv.patch_linear_cross_entropy()
        assert k.linear_cross_entropy is pv.linear_cross_entropy and ff.linear_cross_entropy is pv.linear_cross_entropy
        assert set(patched) == {"verl.utils.kernel.linear_cross_entropy", "verl.models.fused_forward"}, patched
        print("ok")
    """)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_import_without_verl_does_not_need_it():
    assert "verl" not in sys.modules or getattr(sys.modules["verl"], "__file__", None) is not None
    assert callable(pv.compute_policy_loss) and callable(pv.linear_cross_entropy)


def test_linear_cross_entropy_matches_verl_contract():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    logp, ent = pv.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    assert logp.shape == (10,) and ent.shape == (10,) and logp.dtype == torch.float32
    ref = torch.log_softmax((hidden @ weight.T).double() / 0.7, -1)
    torch.testing.assert_close(logp.double(), ref.gather(-1, labels[..., None]).reshape(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1).reshape(-1), atol=1e-5, rtol=0)
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    with pytest.raises(ValueError, match="reduction"):
        pv.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")


def test_against_real_verl_when_installed():
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig

    old, logp, adv, mask, weights = _batch()
    for mode, agg, info in itertools.product(("vanilla", "gspo", "cispo", "sapo"), AGGS, GLOBAL_INFOS):
        config = ActorConfig(strategy="fsdp", clip_ratio_high=0.28, ppo_micro_batch_size_per_gpu=1, rollout_n=4)
        config.global_batch_info.update(info)
        theirs, theirs_m = core.get_policy_loss_fn(mode)(old, logp, adv, mask, agg, config, weights)
        name = "pyrl" if mode == "vanilla" else f"pyrl_{mode}"
        ours, ours_m = core.get_policy_loss_fn(name)(old, logp, adv, mask, agg, config, weights)
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-7, atol=1e-10)
        assert ours_m["actor/ppo_kl"] == pytest.approx(theirs_m["actor/ppo_kl"])


def test_pyrl_public_api_untouched():
    # the verl module builds on pyrl.policy_loss; keep that the public one
    assert pyrl.policy_loss.__module__ == "pyrl.ops.policy_loss"
