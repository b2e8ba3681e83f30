"""The fused GRPO loss (PPO-clip, token-mean, beta=0), fwd+bwd: every registered implementation."""
import pytest

from pyrl.bench import implementations


@pytest.mark.parametrize("impl", implementations("grpo_loss"), ids=lambda i: i.name)
def test_grpo_loss(bench_impl, impl):
    bench_impl(impl)
