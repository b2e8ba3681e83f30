"""pyrl.nn's preference and distillation drop-ins against Liger-Kernel's chunked_loss classes, side by
side on CPU: FusedLinear{DPO,ORPO,CPO,SimPO,KTO,JSD}Loss vs LigerFusedLinear*Loss.

Both modules get the same constructor arguments and the same inputs; the loss, the gradients with
respect to the input, the head and its bias, and every returned metric must agree to float
tolerance (loss 1e-5 relative; gradients 1e-4 of the largest entry; metrics 1e-4). Liger runs with
``compiled=False`` (the values are the same; compiling would take minutes on CPU).
"""
import inspect
import math

import pytest
import torch

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")

import pyrl.nn as pnn  # noqa: E402

B, T, H, V = 2, 6, 8, 37
PAIRS = {"DPO": (pnn.FusedLinearDPOLoss, liger_chunked.LigerFusedLinearDPOLoss),
         "ORPO": (pnn.FusedLinearORPOLoss, liger_chunked.LigerFusedLinearORPOLoss),
         "CPO": (pnn.FusedLinearCPOLoss, liger_chunked.LigerFusedLinearCPOLoss),
         "SimPO": (pnn.FusedLinearSimPOLoss, liger_chunked.LigerFusedLinearSimPOLoss),
         "KTO": (pnn.FusedLinearKTOLoss, liger_chunked.LigerFusedLinearKTOLoss),
         "JSD": (pnn.FusedLinearJSDLoss, liger_chunked.LigerFusedLinearJSDLoss)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # Liger runs many tiny ops per chunk; one thread is faster on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(PAIRS))
def test_same_constructor_and_forward_signature(name):
    ours, liger = PAIRS[name]
    for fn in ("__init__", "forward"):
        mine = [(p.name, p.default) for p in inspect.signature(getattr(ours, fn)).parameters.values()
                if p.kind != p.KEYWORD_ONLY]
        theirs = [(p.name, p.default) for p in inspect.signature(getattr(liger, fn)).parameters.values()]
        assert mine == theirs


def _data(n, seed=0, hidden=H):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, hidden, generator=g)
    w = torch.randn(V, hidden, generator=g) * 2 / math.sqrt(hidden)
    b = 0.3 * torch.randn(V, generator=g)
    y = torch.randint(0, V, (n, T), generator=g)
    y[0, :2] = -100
    y[n - 1, 4:] = -100
    return x, w, b, y


def _leaves(*xs):
    return [None if x is None else x.clone().requires_grad_() for x in xs]


def _compare(got, want, leaves_got, leaves_want):
    loss_g, aux_g = (got[0], got[1:]) if isinstance(got, tuple) else (got, ())
    loss_w, aux_w = (want[0], want[1:]) if isinstance(want, tuple) else (want, ())
    if len(aux_g) == 1 and isinstance(aux_g[0], tuple):
        aux_g, aux_w = aux_g[0], aux_w[0]
    assert float(loss_g.detach()) == pytest.approx(float(loss_w.detach()), rel=1e-5, abs=1e-6)
    assert len(aux_g) == len(aux_w)
    for a, b in zip(aux_g, aux_w):
        torch.testing.assert_close(torch.as_tensor(a).detach().float(), torch.as_tensor(b).detach().float(),
                                   rtol=1e-4, atol=1e-4)
    leaves_g = [x for x in leaves_got if x is not None]
    leaves_w = [x for x in leaves_want if x is not None]
    for gg, gw in zip(torch.autograd.grad(loss_g, leaves_g), torch.autograd.grad(loss_w, leaves_w)):
        scale = gw.abs().max().clamp(min=1e-12)
        assert float((gg - gw).abs().max() / scale) < 1e-4


DPO_CASES = [dict(loss_type=t) for t in ("sigmoid", "hinge", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                                         "apo_down")]
DPO_CASES += [dict(loss_type="robust", label_smoothing=0.2), dict(loss_type="exo_pair", label_smoothing=1e-3),
              dict(loss_type="discopop", discopop_tau=0.3), dict(compute_nll_loss=True, alpha=0.5),
              dict(average_log_prob=True, beta=0.5), dict(use_ref_model=False)]


@pytest.mark.parametrize("opts", DPO_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("with_bias", [True, False])
def test_dpo_matches_liger(opts, with_bias):
    x, w, b, y = _data(2 * B)
    rx, rw, rb, _ = _data(2 * B, seed=1)
    b = b if with_bias else None
    ref = dict(ref_input=rx, ref_weight=rw, ref_bias=rb) if opts.get("use_ref_model", True) else {}
    ours, liger = pnn.FusedLinearDPOLoss(**opts), liger_chunked.LigerFusedLinearDPOLoss(compiled=False, **opts)
    lg, lw = _leaves(w, x, b), _leaves(w, x, b)
    _compare(ours(*lg[:2], y, lg[2], **ref), liger(*lw[:2], y, lw[2], **ref), lg, lw)


@pytest.mark.parametrize("opts", [dict(), dict(compute_nll_loss=False), dict(beta=0.5), dict(nll=True)],
                         ids=["default", "no-nll", "beta", "nll_target"])
def test_orpo_matches_liger(opts):
    x, w, b, y = _data(2 * B)
    nll_target = None
    if opts.pop("nll", False):
        nll_target = torch.randint(0, V, y.shape)
        nll_target[:, :1] = -100
    ours, liger = pnn.FusedLinearORPOLoss(**opts), liger_chunked.LigerFusedLinearORPOLoss(compiled=False, **opts)
    lg, lw = _leaves(w, x, b), _leaves(w, x, b)
    _compare(ours(*lg[:2], y, lg[2], nll_target), liger(*lw[:2], y, lw[2], nll_target), lg, lw)


@pytest.mark.parametrize("name", ["CPO", "SimPO"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, alpha=0.3), dict(compute_nll_loss=False),
                                  dict(beta=1.0)], ids=["default", "smoothing-alpha", "no-nll", "beta"])
def test_cpo_simpo_match_liger(name, opts):
    opts = dict(opts)
    if name == "SimPO":
        opts.setdefault("gamma", 0.8)
    else:
        opts.setdefault("average_log_prob", "beta" in opts)
    x, w, b, y = _data(2 * B)
    ours_cls, liger_cls = PAIRS[name]
    ours, liger = ours_cls(**opts), liger_cls(compiled=False, **opts)
    lg, lw = _leaves(w, x, b), _leaves(w, x, b)
    _compare(ours(*lg[:2], y, lg[2]), liger(*lw[:2], y, lw[2]), lg, lw)


@pytest.mark.parametrize("opts", [dict(), dict(use_ref_model=True), dict(use_ref_model=True, kl=True),
                                  dict(average_log_prob=True, beta=0.5)],
                         ids=["default", "ref", "ref-kl", "average"])
def test_kto_matches_liger(opts):
    opts = dict(opts)
    x, w, b, y = _data(5)
    rx, rw, rb, _ = _data(5, seed=1)
    labels = torch.tensor([True, False, True, False, False])
    kw = dict(preference_labels=labels, ref_input=rx, ref_weight=rw, ref_bias=rb)
    if opts.pop("kl", False):
        kw["kl"] = torch.tensor(0.3)
    ours, liger = pnn.FusedLinearKTOLoss(**opts), liger_chunked.LigerFusedLinearKTOLoss(compiled=False, **opts)
    lg, lw = _leaves(x, w, b), _leaves(x, w, b)
    _compare(ours(*lg[:2], y, lg[2], **kw), liger(*lw[:2], y, lw[2], **kw), lg, lw)


@pytest.mark.parametrize("opts", [dict(), dict(beta=0.0), dict(beta=1.0), dict(beta=0.3, temperature=2.0),
                                  dict(weight_hard_loss=0.0, weight_soft_loss=1.0),
                                  dict(return_soft_hard_loss=True, weight_hard_loss=0.2)],
                         ids=["default", "forward-kl", "reverse-kl", "beta-temperature", "soft-only", "soft-hard"])
def test_jsd_matches_liger(opts):
    x, w, b, y = _data(1)
    xt, wt, bt, _ = _data(1, seed=1, hidden=12)
    x, xt, y = x.reshape(T, H), xt.reshape(T, 12), y.reshape(T)
    ours, liger = pnn.FusedLinearJSDLoss(**opts), liger_chunked.LigerFusedLinearJSDLoss(compiled=False, **opts)
    lg, lw = _leaves(x, w, b), _leaves(x, w, b)
    _compare(ours(lg[0], lg[1], xt, wt, y, lg[2], bt), liger(lw[0], lw[1], xt, wt, y, lw[2], bt), lg, lw)


def test_constructor_checks_are_liger_s():
    with pytest.raises(ValueError, match="Unsupported loss_type"):
        pnn.FusedLinearDPOLoss(loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing must be > 0"):
        pnn.FusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0.0, 0.5\)"):
        pnn.FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="use_ref_model=True needs ref_input"):
        x, w, b, y = _data(2 * B)
        pnn.FusedLinearDPOLoss()(w, x, y)
