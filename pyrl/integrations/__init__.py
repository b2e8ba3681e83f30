"""Drop pyrl's fused losses into the loops people already have.

Each submodule imports its framework lazily, so ``import pyrl.integrations`` needs none of them:

* ``pyrl.integrations.hf``: run a Hugging Face causal LM's backbone and get the completion hidden
  states plus the LM head to feed ``pyrl.fused_linear_policy_loss`` (needs ``transformers``).
* ``pyrl.integrations.trl``: ``PyrlGRPOTrainer``, TRL's ``GRPOTrainer`` with pyrl's loss (needs ``trl``).
* ``pyrl.integrations.verl``: pyrl's loss registered in verl's policy-loss registry, and a drop-in for
  verl's fused ``linear_cross_entropy`` kernel (verl is optional even there).

See ``docs/integrations.md``.
"""
