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
