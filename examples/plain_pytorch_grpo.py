"""GRPO in plain PyTorch: a hand-written loop around pyrl's fused loss and advantages.

The toy task: the prompt is a few random tokens; the reward is the fraction of the completion's
tokens that repeat the prompt's first token. A randomly initialised tiny Llama starts at chance
(1 / vocabulary) and learns the task in a few dozen steps on a CPU:

    python examples/plain_pytorch_grpo.py            # ~1 minute on 2 CPU cores
    python examples/plain_pytorch_grpo.py --steps 2  # smoke test

Everything RL-specific is two calls: ``pyrl.advantages.compute`` (group-relative advantages) and
``pyrl.fused_linear_policy_loss`` (log-probs, entropy, clipped loss and aggregation straight from
the last hidden states and the LM-head weight, never building the [B, T, V] logits), plus
``pyrl.fused_linear_logprobs`` once per batch for the sampling policy's log-probs.
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pyrl


def reward_fn(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """[B] fraction of completion tokens equal to the prompt's first token."""
    return (completions == prompts[:, :1]).float().mean(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompt-len", type=int, default=4)
    parser.add_argument("--completion-len", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8)
    parser.add_argument("--updates", type=int, default=2, help="optimizer steps per batch (PPO epochs)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                                         eos_token_id=None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # DAPO-style clip-higher, token-mean aggregation; the KL term is off (no reference model needed).
    config = pyrl.PolicyLossConfig(loss_type="ppo", eps_low=0.2, eps_high=0.28, agg="token-mean")
    G, P, C = args.group_size, args.prompt_len, args.completion_len

    def hidden_states(sequences):
        """Last hidden states at the positions that predict the completion tokens: [B, C, H]."""
        out = model.model(input_ids=sequences, use_cache=False)
        return out.last_hidden_state[:, P - 1:-1]

    history, start = [], time.time()
    for step in range(args.steps):
        # 1. Rollout: G sampled completions per prompt (completions of a prompt are contiguous).
        prompts = torch.randint(1, args.vocab, (args.prompts, P)).repeat_interleave(G, dim=0)
        model.eval()
        with torch.no_grad():
            sequences = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                       temperature=1.0, top_k=0, max_new_tokens=C, min_new_tokens=C,
                                       pad_token_id=0)
        completions = sequences[:, P:]
        mask = torch.ones_like(completions, dtype=torch.bool)  # fixed length: no EOS in this task

        # 2. Rewards -> group-relative advantages (GRPO: (R - mean_g) / (std_g + eps)).
        rewards = reward_fn(prompts, completions)
        advantages = pyrl.advantages.compute("grpo", rewards, group_size=G)

        # 3. PPO-style updates on this batch. The ratio is taken against the policy that sampled
        #    (its log-probs, computed once, without gradient); on the first update it is 1.
        model.train()
        old_logp = None
        if args.updates > 1:
            with torch.no_grad():
                old_logp = pyrl.fused_linear_logprobs(hidden_states(sequences), model.lm_head.weight, completions)
        for _ in range(args.updates):
            loss, metrics = pyrl.fused_linear_policy_loss(hidden_states(sequences), model.lm_head.weight,
                                                          completions, mask, advantages, old_logp=old_logp,
                                                          config=config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        history.append(rewards.mean().item())
        print(f"step {step:3d}  reward {rewards.mean():.3f}  loss {loss.item():+.4f}  "
              f"entropy {metrics['entropy_mean']:.3f}  clip_frac {metrics['clip_frac']:.3f}  "
              f"{time.time() - start:5.1f}s", flush=True)

    k = max(1, min(5, len(history) // 4))
    print(f"mean reward: first {k} steps {sum(history[:k]) / k:.3f} -> "
          f"last {k} steps {sum(history[-k:]) / k:.3f}")


if __name__ == "__main__":
    main()
