"""The policy-loss catalogue: every per-token surrogate is one registered function that declares
what it is (docs/formulas.md §3).

    @pyrl.register_policy_loss("my_loss", token_separable=True)
    def my_loss(logp, ratio, advantages, config):
        return -advantages * ratio, None      # (per-token loss [B, T], clipped [B, T] bool | None)

    pyrl.PolicyLossConfig(loss_type="my_loss")

The function gets ``logp``, ``ratio`` (token- or sequence-level, docs/formulas.md §2) and
``advantages`` broadcast to ``[B, T]``, plus the config; masking, mismatch weights, KL, entropy
and the aggregation are applied around it. What a registration declares:

* ``token_separable``: token ``t``'s loss depends on token ``t``'s inputs alone (an elementwise
  function). Only such losses run on the one-pass plan of ``fused_linear_policy_loss``, which
  calls the function on flattened token chunks ``[1, c]`` instead of ``[B, T]``
  (docs/formulas.md §10). Default ``False``: the two-pass plan, which always sees ``[B, T]``.
* ``params``: the ``PolicyLossConfig`` fields this loss owns, each with its validator
  ``check(qualified_name, value)``; they are validated at config construction. A field whose
  default is ``None`` (``delta``, ``clip_ratio_c``) may be set only with a loss that owns it.
* ``nullable``: fields with a non-``None`` default that this loss accepts as ``None``
  (``cispo``: ``eps_low=None``, no lower bound).
* ``needs_mask``: the function also gets ``mask=`` the ``[B, T]`` bool of valid tokens (a loss
  that averages over a sequence or selects tokens over the batch: ``geo_mean``, ``clip_cov``,
  ``kl_cov``). Such a loss is never token-separable.

A name is registered once; a duplicate raises ``ValueError`` (``replace=True`` overrides on
purpose). ``unregister_policy_loss`` removes one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Tuple

import torch

from pyrl.registry import Registry

__all__ = ["PolicyLossSpec", "POLICY_LOSSES", "register_policy_loss", "unregister_policy_loss",
           "get_policy_loss", "policy_loss_names"]

# (logp, ratio, advantages, config) -> (per-token loss [B, T], clipped [B, T] bool | None)
PolicyLossFn = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]
ParamCheck = Callable[[str, object], None]


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registered surrogate and what it declares (see the module docstring)."""

    name: str
    fn: PolicyLossFn
    token_separable: bool = False
    params: Mapping[str, ParamCheck] = field(default_factory=dict)
    nullable: Tuple[str, ...] = ()
    needs_mask: bool = False


POLICY_LOSSES: Registry[PolicyLossSpec] = Registry("policy loss")


def register_policy_loss(name: str, *, token_separable: bool = False,
                         params: Optional[Mapping[str, ParamCheck]] = None, nullable: Tuple[str, ...] = (),
                         needs_mask: bool = False, replace: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a per-token surrogate as ``PolicyLossConfig(loss_type=name)``.

    See the module docstring for ``token_separable``, ``params``, ``nullable`` and ``needs_mask``. Returns the
    function unchanged. A duplicate name raises ``ValueError`` unless ``replace=True``.
    """
    for flag, value in (("token_separable", token_separable), ("needs_mask", needs_mask)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__} {value!r}")
    if token_separable and needs_mask:
        raise ValueError("a loss with needs_mask=True sees the whole [B, T] batch: it cannot be token_separable")
    params = dict(params or {})
    for key, check in params.items():
        if not callable(check):
            raise TypeError(f"params[{key!r}] must be a validator check(name, value), got {type(check).__name__}")
    nullable = tuple(nullable)

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if not callable(fn):
            raise TypeError(f"a policy loss must be callable, got {type(fn).__name__}")
        if name in POLICY_LOSSES and not replace:
            raise ValueError(f"a policy loss named {name!r} is already registered; pick another name "
                             f"or pass replace=True")
        POLICY_LOSSES.register(name, PolicyLossSpec(name, fn, token_separable, params, nullable, needs_mask), replace=True)
        return fn

    return decorator


def unregister_policy_loss(name: str) -> PolicyLossSpec:
    """Remove a registered policy loss (``ValueError`` if there is none of that name)."""
    return POLICY_LOSSES.unregister(name)


def get_policy_loss(name: str) -> PolicyLossSpec:
    return POLICY_LOSSES.get(name)


def policy_loss_names() -> list:
    """The registered ``loss_type`` names, sorted."""
    return POLICY_LOSSES.names()


from pyrl.losses import surrogates, covariance, gmpo, grouped  # noqa: E402,F401  (registers the built-in losses)
