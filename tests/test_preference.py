"""fused_linear_preference_loss against a float64 full-logits computation, on every backend.

The reference: float64 logits ``h @ W.T + b`` of the whole batch, ``log_softmax``, each completion's
summed (or averaged) log-prob, then the loss formula in float64 (``pyrl.losses.preference``, whose
formulas are checked independently against Liger-Kernel in tests/test_nn_preference_parity.py and,
for IPO, against an inline transcription of TRL's formula below). Shapes are odd on purpose: V=37
(not a multiple of any block), a completion of length 1, an all-masked completion, several chunks.

Tolerances: fp32 inputs 2e-5 relative on the loss and 1e-4 of the largest gradient entry; bf16
inputs are compared with the reference on the same rounded inputs at 1e-2 (bf16 gradients).
"""
import math

import pytest
import torch

import pyrl
from conftest import CPU_BACKENDS, triton_on_cpu
from pyrl.losses.preference import PAIR_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, kto_kl_baseline, kto_loss, pair_loss

TRITON = triton_on_cpu()
ALL_BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton"))]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's masked lanes

B, T, H, V = 3, 5, 8, 37
TEMPERATURE = 0.8
OPTIONS = {"robust": dict(label_smoothing=0.2), "exo_pair": dict(label_smoothing=1e-3), "cpo": dict(label_smoothing=0.1),
           "simpo": dict(gamma=0.3, label_smoothing=0.05), "discopop": dict(discopop_tau=0.3)}


def _batch(dtype=torch.float32, seed=0, n=2 * B):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / math.sqrt(H)).to(dtype)
    bias = (0.3 * torch.randn(V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (n, T), generator=g)
    targets[0, :2] = -100    # a prompt prefix
    targets[1, 1:] = -100    # a chosen completion of one token
    targets[n - 1, 3:] = -100
    ref_hidden = (hidden.float() + 0.3 * torch.randn(n, T, H, generator=g)).to(dtype)
    ref_weight = (weight.float() + 0.1 * torch.randn(V, H, generator=g)).to(dtype)
    return hidden, weight, bias, targets, ref_hidden, ref_weight


def _logps64(hidden, weight, bias, targets, average, temperature=TEMPERATURE):
    z = (hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())) / temperature
    lp = z.log_softmax(-1)
    valid = targets != -100
    tok = torch.where(valid, lp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    total = tok.sum(-1)
    lengths = valid.sum(-1)
    return (total / lengths.clamp(min=1) if average else total), tok, valid, lengths


def _reference(loss_type, hidden, weight, bias, targets, ref, alpha, **opts):
    average = loss_type in ("simpo", "orpo")
    logps, tok, valid, lengths = _logps64(hidden, weight, bias, targets, average)
    n = logps.shape[0] // 2
    losses, _, _, _ = pair_loss(loss_type, logps[:n], logps[n:], ref_chosen_logps=None if ref is None else ref[:n],
                                ref_rejected_logps=None if ref is None else ref[n:], beta=0.1,
                                chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], **opts)
    nll = -tok[:n].sum() / valid[:n].sum()
    return losses.mean() + alpha * nll


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _close_grads(got, want, tol):
    for gg, gw in zip(got, want):
        scale = gw.abs().max().clamp(min=1e-30)
        assert float((gg.double() - gw).abs().max() / scale) < tol


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_pair_losses_match_float64(loss_type, backend):
    hidden, weight, bias, targets, ref_hidden, ref_weight = _batch()
    opts = OPTIONS.get(loss_type, {})
    alpha = 0.7
    ref = None
    if loss_type not in REFERENCE_FREE_LOSS_TYPES:
        ref, _, _, _ = _logps64(ref_hidden, ref_weight, None, targets, False)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, out = pyrl.fused_linear_preference_loss(
        *leaves[:2], targets, bias=leaves[2], loss_type=loss_type, beta=0.1, alpha=alpha, temperature=TEMPERATURE,
        ref_hidden=None if ref is None else ref_hidden, ref_weight=None if ref is None else ref_weight,
        backend=backend, chunk_bytes=7 * V * 4, **opts)
    leaves64 = [x.double().clone().requires_grad_() for x in (hidden, weight, bias)]
    want = _reference(loss_type, *leaves64, targets, ref, alpha, **opts)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=2e-5, abs=1e-6)
    _close_grads(_grads(loss, leaves), _grads(want, leaves64), 1e-4)
    logps, _, _, _ = _logps64(hidden, weight, bias, targets, loss_type in ("simpo", "orpo"))
    torch.testing.assert_close(out["chosen_logps"].double(), logps[:B], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["rejected_logps"].double(), logps[B:], rtol=1e-5, atol=1e-5)
    z = hidden.double() @ weight.double().t() + bias.double()
    assert float(out["chosen_logits_mean"]) == pytest.approx(float(z[:B].mean()), abs=1e-5)


def test_ipo_is_trl_length_normalised_formula():
    """IPO transcribed from TRL's DPOTrainer: ((a_w/|y_w| - a_l/|y_l|) - 1/(2 beta))^2, mean over pairs."""
    hidden, weight, bias, targets, _, _ = _batch()
    ref = torch.randn(2 * B, dtype=torch.float64)
    loss, _ = pyrl.fused_linear_preference_loss(hidden.double(), weight.double(), targets, bias=bias.double(),
                                                loss_type="ipo", beta=0.2, ref_logps=ref, temperature=TEMPERATURE)
    logps, _, valid, lengths = _logps64(hidden, weight, bias, targets, False)
    a = (logps - ref) / lengths.clamp(min=1)
    want = ((a[:B] - a[B:] - 1 / (2 * 0.2)) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kto_matches_float64(backend):
    hidden, weight, bias, targets, ref_hidden, ref_weight = _batch(n=5)
    labels = torch.tensor([True, False, True, True, False])
    ref_tok = _logps64(ref_hidden, ref_weight, None, targets, False)[1].float()
    kl = torch.tensor(0.4)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, out = pyrl.fused_linear_preference_loss(*leaves[:2], targets, bias=leaves[2], loss_type="kto", beta=0.3,
                                                  preference_labels=labels, ref_logps=ref_tok, kl=kl,
                                                  desirable_weight=1.5, undesirable_weight=0.5,
                                                  temperature=TEMPERATURE, backend=backend, chunk_bytes=7 * V * 4)
    leaves64 = [x.double().clone().requires_grad_() for x in (hidden, weight, bias)]
    logps, _, _, _ = _logps64(*leaves64, targets, False)
    ref = ref_tok.double().sum(-1)
    a = logps - ref
    per = torch.where(labels, 1.5 * (1 - torch.sigmoid(0.3 * (a - 0.4))), 0.5 * (1 - torch.sigmoid(0.3 * (0.4 - a))))
    want = per.mean()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=2e-5)
    _close_grads(_grads(loss, leaves), _grads(want, leaves64), 1e-4)
    assert float(out["chosen_rewards_sum"]) == pytest.approx(float((0.3 * a)[labels].sum()), rel=1e-4, abs=1e-5)
    assert float(out["kl"]) == pytest.approx(0.4)


def test_kto_kl_baseline_is_clamped_mean():
    assert float(kto_kl_baseline(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5]))) == pytest.approx(0.25)
    assert float(kto_kl_baseline(torch.tensor([-3.0]), torch.tensor([-2.0]))) == 0.0
    losses, rewards = kto_loss(torch.tensor([-1.0]), torch.tensor([True]), beta=0.5)
    assert float(losses[0]) == pytest.approx(1 - 1 / (1 + math.exp(0.5)))


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES + ("kto",))
def test_all_masked_completions_give_no_nan(loss_type):
    """An empty completion (every target ignore_index) scores 0: finite loss, finite gradients."""
    hidden, weight, bias, targets, _, _ = _batch(dtype=torch.float64)
    targets[0] = -100
    targets[B] = -100
    kw = dict(OPTIONS.get(loss_type, {}))
    if loss_type == "kto":
        targets = targets[:B]
        hidden = hidden[:B]
        kw.update(preference_labels=torch.tensor([True, False, True]))
    else:
        kw.update(alpha=1.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, out = pyrl.fused_linear_preference_loss(h, w, targets, loss_type=loss_type, **kw)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (h.grad[0] == 0).all()


def test_bf16_accumulates_in_fp32():
    hidden, weight, bias, targets, ref_hidden, ref_weight = _batch(dtype=torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    loss, out = pyrl.fused_linear_preference_loss(*leaves, targets, loss_type="sigmoid", ref_hidden=ref_hidden,
                                                  ref_weight=ref_weight, temperature=TEMPERATURE, alpha=0.5)
    assert loss.dtype == torch.float32 and out["chosen_logps"].dtype == torch.float32
    leaves64 = [x.double().clone().requires_grad_() for x in (hidden, weight)]
    ref, _, _, _ = _logps64(ref_hidden, ref_weight, None, targets, False)
    want = _reference("sigmoid", *leaves64, None, targets, ref, 0.5)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    _close_grads(_grads(loss, leaves), _grads(want, leaves64), 1e-2)


def test_reference_given_or_from_hidden_agree():
    hidden, weight, bias, targets, ref_hidden, ref_weight = _batch(dtype=torch.float64)
    a, _ = pyrl.fused_linear_preference_loss(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
    tok = pyrl.fused_linear_logprobs(ref_hidden, ref_weight, targets)
    b, _ = pyrl.fused_linear_preference_loss(hidden, weight, targets, ref_logps=tok)
    c, _ = pyrl.fused_linear_preference_loss(hidden, weight, targets, ref_logps=tok.sum(-1))
    assert float(a) == pytest.approx(float(b), rel=1e-12) and float(b) == pytest.approx(float(c), rel=1e-12)


def test_nll_targets_replace_the_chosen_labels():
    hidden, weight, bias, targets, _, _ = _batch(dtype=torch.float64)
    other = torch.randint(0, V, targets.shape)
    other[:, 0] = -100
    _, out = pyrl.fused_linear_preference_loss(hidden, weight, targets, loss_type="orpo", alpha=1.0,
                                               nll_targets=other, temperature=TEMPERATURE)
    _, tok, valid, _ = _logps64(hidden, weight, None, other, False)
    assert float(out["nll_loss"]) == pytest.approx(float(-tok[:B].sum() / valid[:B].sum()), rel=1e-10)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss_type="dpo"), ValueError, "loss_type must be one of"),
    (dict(beta=0.0), ValueError, "beta must be"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing must be"),
    (dict(loss_type="exo_pair"), ValueError, "label_smoothing must be in \\(0, 1\\)"),
    (dict(loss_type="simpo", ref_logps=torch.zeros(6)), ValueError, "reference-free"),
    (dict(ref_logps=torch.zeros(4)), ValueError, "ref_logps must have shape \\[6\\]"),
    (dict(loss_type="kto"), ValueError, "needs preference_labels"),
    (dict(preference_labels=torch.ones(6, dtype=torch.bool)), ValueError, "belong to loss_type='kto'"),
    (dict(ref_weight=torch.zeros(V, H)), ValueError, "ref_weight was given without ref_hidden"),
    (dict(ref_hidden=torch.zeros(6, T, 4)), ValueError, "ref_hidden was given without ref_weight"),
])
def test_rejects_bad_input_naming_the_argument(kwargs, error, match):
    hidden, weight, _, targets, _, _ = _batch()
    with pytest.raises(error, match=match):
        pyrl.fused_linear_preference_loss(hidden, weight, targets, **kwargs)
    with pytest.raises(ValueError, match="stack B chosen then B rejected"):
        pyrl.fused_linear_preference_loss(hidden[:5], weight, targets[:5])


def test_explain_names_the_two_pass_plan():
    hidden, weight, _, targets, _, _ = _batch()
    text = pyrl.explain("fused_linear_preference_loss", hidden, weight, targets, backend="torch")
    assert text.startswith("fused_linear_preference_loss: backend=torch") and "passes=two" in text
