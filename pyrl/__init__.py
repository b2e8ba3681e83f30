"""pyrl (bootstrapping: the full surface is wired once every module exists)."""
from pyrl._backend import backends
from pyrl.ops.logprobs import fused_linear_logprobs, logprobs_from_logits

__version__ = "0.1.0"
