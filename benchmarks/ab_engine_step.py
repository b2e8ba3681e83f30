"""One side of the interleaved engine A/B (benchmarks/results/cpu-engine-ab.md).

    python benchmarks/ab_engine_step.py linear|grpo REPEATS

times ``fused_linear_logprobs`` with entropy (``linear``) or a no-grad log-prob pass plus
``fused_linear_policy_loss`` (``grpo``), forward + backward, ``backend="cpp"``, N=2048, H=896,
V=151936, fp32, after one warm-up; prints which pyrl it imported, the median and every time in s.
Run it alternately with ``PYTHONPATH=<another checkout>`` to compare two trees side by side.
"""
import sys, time, statistics, torch, pyrl
op, reps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
N, H, V = 2048, 896, 151936
h = torch.randn(N, H) * 0.5
w = torch.randn(V, H) / H ** 0.5
y = torch.randint(0, V, (N,))
def step():
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    if op == "linear":
        lp, en = pyrl.fused_linear_logprobs(hh, ww, y, return_entropy=True, backend="cpp")
        (lp.sum() + 0.1 * en.sum()).backward()
    else:
        B, T = 8, 256
        mask = torch.ones(B, T); adv = torch.randn(B)
        with torch.no_grad():
            old = pyrl.fused_linear_logprobs(h.view(B, T, H), w, y.view(B, T), backend="cpp") + 0.05
        loss, _ = pyrl.fused_linear_policy_loss(hh.view(B, T, H), ww, y.view(B, T), mask, adv, old_logp=old,
                                                config=pyrl.PolicyLossConfig(eps_high=0.28), backend="cpp")
        loss.backward()
step()
ts = []
for _ in range(reps):
    t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
print(pyrl.__file__, op, f"{statistics.median(ts):.3f}", " ".join(f"{t:.3f}" for t in ts))
