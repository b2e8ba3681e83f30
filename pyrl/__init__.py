"""pyrl: fused kernels, losses and a lean trainer for RL post-training of language models.

The public surface: ``fused_linear_logprobs``, ``logprobs_from_logits``, ``policy_loss``,
``fused_linear_policy_loss``, ``fused_linear_preference_loss``, ``fused_linear_distillation_loss``,
``PolicyLossConfig``, ``register_policy_loss``, ``explain``,
``pyrl.nn``, ``pyrl.advantages`` and ``backends()``. Formulas: docs/formulas.md.
"""
from pyrl._backend import backends
from pyrl.config import PolicyLossConfig
from pyrl.losses import policy_loss_names, register_policy_loss, unregister_policy_loss
from pyrl.ops.logprobs import fused_linear_logprobs, logprobs_from_logits
from pyrl.ops.fused_policy_loss import fused_linear_policy_loss
from pyrl.ops.policy_loss import policy_loss
from pyrl.ops.preference import fused_linear_preference_loss
from pyrl.ops.distill import fused_linear_distillation_loss
from pyrl.ops.explain import explain
from pyrl import advantages, nn  # noqa: E402  (submodules users reach as pyrl.advantages / pyrl.nn)

__version__ = "0.1.0"

__all__ = [
    "PolicyLossConfig",
    "advantages",
    "backends",
    "explain",
    "fused_linear_distillation_loss",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "fused_linear_preference_loss",
    "logprobs_from_logits",
    "nn",
    "policy_loss",
    "policy_loss_names",
    "register_policy_loss",
    "unregister_policy_loss",
]
