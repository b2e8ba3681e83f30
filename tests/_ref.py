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


def sampler_keep_ref(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, order="hf"):
    """float64 kept-set mask of the sampler's truncation, written from HF's warpers (TopK, TopP, MinP
    in ``transformers.generation.logits_process``) applied in ``order`` ("hf": top-k, top-p, min-p;
    "vllm": min-p, top-k, top-p), with pyrl's one documented difference (docs/formulas.md §1.1):
    every token tied with the smallest value top-p keeps is kept too. Returns ``(z, keep)``."""
    z = logits.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    ninf = float("-inf")

    def top_k_step(keep):  # HF TopK: remove scores < the k-th largest score (ties kept)
        kth = z.masked_fill(~keep, ninf).topk(min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
        return keep & (z >= kth)

    def top_p_step(keep):  # HF TopP: ascending sort, remove while the cumulative softmax <= 1 - top_p
        ordered = z.masked_fill(~keep, ninf).sort(dim=-1).values
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False  # min_tokens_to_keep = 1
        boundary = ordered.masked_fill(remove, float("inf")).amin(-1, keepdim=True)
        return keep & (z >= boundary)

    def min_p_step(keep):  # HF MinP: remove p < min_p * p_max
        p = z.masked_fill(~keep, ninf).softmax(-1)
        return keep & (p >= min_p * p.amax(-1, keepdim=True))

    steps = {"top_k": (top_k is not None, top_k_step), "top_p": (top_p is not None and top_p < 1, top_p_step),
             "min_p": (min_p is not None, min_p_step)}
    for name in (("top_k", "top_p", "min_p") if order == "hf" else ("min_p", "top_k", "top_p")):
        on, step = steps[name]
        if on:
            keep = step(keep)
    return z, keep


def sampler_logprobs_ref(logits, targets, temperature=1.0, top_k=None, top_p=None, min_p=None, order="hf",
                         ignore_index=-100):
    """float64 log-prob and entropy under the truncated, renormalised distribution of
    ``sampler_keep_ref`` (differentiable, the kept set fixed); ignored rows give 0."""
    z, keep = sampler_keep_ref(logits, temperature, top_k, top_p, min_p, order)
    logp_all = torch.log_softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * torch.where(keep, logp_all, torch.zeros_like(logp_all))).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)
