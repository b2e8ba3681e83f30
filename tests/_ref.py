"""Independent float64 references the tests compare every backend against (full logits, no chunking)."""
import torch


def logprobs_ref(logits, targets, temperature=1.0, ignore_index=-100):
    """float64 log-prob and entropy of each row; ignored rows give 0."""
    z = logits.double() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)


def linear_logprobs_ref(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return logprobs_ref(logits, targets, temperature, ignore_index)


def assert_fused_matches_float64(loss, metrics, want, grads, dtype):
    """A fused loss (fp32 or bf16 inputs) against its float64 oracle: the loss within 1e-4 (fp32) or
    2e-2 (bf16) and every gradient, in the input dtype, within 4x that of its largest entry.
    ``grads``: ``(got, want)`` pairs."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values())
    torch.testing.assert_close(loss.double(), want, atol=tol, rtol=tol)
    for got, ref in grads:
        assert got.dtype == dtype and torch.isfinite(got).all()
        scale = ref.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got.double() / scale, ref / scale, atol=4 * tol, rtol=0)


def fused_with_grads(hidden, weight, targets, mask, advantages, **kw):
    """``fused_linear_policy_loss`` on leaf copies of ``hidden`` and ``weight``, backpropagated:
    ``(loss, metrics, d_hidden, d_weight)``."""
    import pyrl
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, targets, mask, advantages, **kw)
    loss.backward()
    return loss, metrics, h.grad, w.grad
