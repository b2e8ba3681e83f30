"""``torch.nn.Module`` forms of pyrl's ops, with the argument names users of Liger-Kernel/TRL know."""
from __future__ import annotations

import torch

from pyrl.ops.logprobs import fused_linear_logprobs

__all__ = ["FusedLinearLogProbs"]


class FusedLinearLogProbs(torch.nn.Module):
    """Module form of :func:`pyrl.fused_linear_logprobs`.

    ``forward(hidden [..., H], weight [V, H], targets [...], bias=None)`` returns ``logp [...]``
    (or ``(logp, entropy)`` when ``return_entropy=True``), never holding ``[N, V]`` logits.
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.backend = backend

    def forward(self, hidden, weight, targets, bias=None):
        return fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                     ignore_index=self.ignore_index, return_entropy=self.return_entropy,
                                     backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, backend={self.backend!r}")
