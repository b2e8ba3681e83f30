"""Per-token log-prob + entropy, from hidden states and from logits: every registered implementation."""
import pytest

from pyrl.bench import implementations


@pytest.mark.parametrize("impl", implementations("linear_logprobs"), ids=lambda i: i.name)
def test_linear_logprobs(bench_impl, impl):
    bench_impl(impl)


@pytest.mark.parametrize("impl", implementations("logits_logprobs"), ids=lambda i: i.name)
def test_logits_logprobs(bench_impl, impl):
    bench_impl(impl)
