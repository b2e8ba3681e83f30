"""Preference optimisation, then distillation, from hidden states with pyrl's fused losses.

The toy task: a prompt of random tokens; the *chosen* completion repeats the prompt's first token,
the *rejected* one is random. A randomly initialised tiny Llama learns to prefer the chosen
completions with DPO against a frozen copy of itself (held-out preference accuracy and reward
margin rise), then a smaller student is distilled from it with the reverse KL on the chosen
completions, and its log-prob of the chosen completions rises towards the teacher's:

    python examples/dpo_and_distill.py            # ~1 minute on 2 CPU cores
    python examples/dpo_and_distill.py --steps 2  # smoke test

The losses are ``pyrl.fused_linear_preference_loss`` (docs/formulas.md §13) and
``pyrl.fused_linear_distillation_loss`` (§14): both take the last hidden states and the LM-head
weight, never building the [B, T, V] logits.
"""
import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pyrl


def tiny_llama(vocab, hidden, layers, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def batch(n, prompt_len, completion_len, vocab, gen):
    prompts = torch.randint(0, vocab, (n, prompt_len), generator=gen)
    chosen = prompts[:, :1].expand(n, completion_len)
    rejected = torch.randint(0, vocab, (n, completion_len), generator=gen)
    return torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])  # [2n, P + C]


def hidden_and_targets(model, ids, prompt_len):
    """The states that predict the completion tokens, and those tokens."""
    h = model.model(input_ids=ids).last_hidden_state
    return h[:, prompt_len - 1:-1], ids[:, prompt_len:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="DPO steps (and as many distillation steps)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=4)
    parser.add_argument("--completion-len", type=int, default=6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    held_out = batch(32, args.prompt_len, args.completion_len, args.vocab, gen)

    policy = tiny_llama(args.vocab, 32, 2, seed=0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr)

    def dpo(ids):
        h, y = hidden_and_targets(policy, ids, args.prompt_len)
        with torch.no_grad():
            h_ref, _ = hidden_and_targets(reference, ids, args.prompt_len)
        return pyrl.fused_linear_preference_loss(h, policy.lm_head.weight, y, loss_type="sigmoid", beta=args.beta,
                                                 ref_hidden=h_ref, ref_weight=reference.lm_head.weight)

    for step in range(args.steps):
        loss, _ = dpo(batch(args.pairs, args.prompt_len, args.completion_len, args.vocab, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            with torch.no_grad():
                _, out = dpo(held_out)
            print(f"dpo step {step} loss {float(loss.detach()):.4f} held-out accuracy {float(out['reward_accuracy']):.2f} "
                  f"margin {float(out['reward_margin']):.3f}", flush=True)

    # Distil the DPO-trained policy (the teacher) into a smaller student on the chosen completions.
    teacher = policy.requires_grad_(False)
    student = tiny_llama(args.vocab, 16, 1, seed=1)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    chosen = held_out[: held_out.shape[0] // 2]

    def chosen_logp(model):
        with torch.no_grad():
            h, y = hidden_and_targets(model, chosen, args.prompt_len)
            return float(pyrl.fused_linear_logprobs(h, model.lm_head.weight, y).sum(-1).mean())

    first = chosen_logp(student)
    for step in range(args.steps):
        ids = batch(args.pairs, args.prompt_len, args.completion_len, args.vocab, gen)[: args.pairs]
        h, y = hidden_and_targets(student, ids, args.prompt_len)
        with torch.no_grad():
            h_t, _ = hidden_and_targets(teacher, ids, args.prompt_len)
        loss, out = pyrl.fused_linear_distillation_loss(h, student.lm_head.weight, h_t, teacher.lm_head.weight, y,
                                                        divergence="reverse_kl")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"distill step {step} reverse KL {float(out['soft_loss']):.4f}", flush=True)
    print(f"chosen log-prob: student {first:.2f} -> {chosen_logp(student):.2f}, teacher {chosen_logp(teacher):.2f}")


if __name__ == "__main__":
    main()
