// CPU bodies of pyrl::logprobs_fwd / logprobs_bwd(_): per-token log-prob and entropy from logits.
//
// Forward makes ONE pass over each row's vocabulary: blocks of BLOCK logits are max-reduced, the
// running (max m, sum-exp s, sum exp*(z-m) t) are rescaled when the max grows, and the block's
// exponentials are accumulated in a vectorisable loop. Accumulating t relative to the running max
// keeps entropy = log(s) - t/s accurate even for logits of 1e4 (no lse - E[z] cancellation).
// Backward recomputes p = exp(z - lse) from the saved lse; nothing [N, V] is kept in between.
// Rows are split across threads (at::parallel_for: torch's OpenMP pool), so a row's reduction
// order never depends on N or on the other rows: results are batch-invariant bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

constexpr int64_t BLOCK = 2048;

template <typename scalar_t, typename acc_t>
void fwd_rows(const scalar_t* logits, int64_t rows, int64_t V, int64_t stride, const int64_t* tgt,
              acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* logp, acc_t* ent,
              acc_t* lse) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  // -inf logits are clamped to the lowest finite value inside the sums: exp() gives exactly 0 and
  // 0 * finite stays 0, where 0 * -inf would be NaN.
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = logits + n * stride;
      acc_t m = NEG_INF, s = 0, t = 0;
      for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
        const int64_t v1 = std::min(V, v0 + BLOCK);
        acc_t bm = NEG_INF;
        for (int64_t v = v0; v < v1; ++v) bm = std::max(bm, static_cast<acc_t>(row[v]));
        bm *= inv_t;
        if (!(bm > NEG_INF)) continue;  // block entirely -inf: contributes nothing
        if (bm > m) {
          if (s > 0) {
            const acc_t sc = std::exp(m - bm);
            t = sc * (t + s * (m - bm));
            s *= sc;
          }
          m = bm;
        }
        acc_t bs = 0, bt = 0;
        if (with_entropy) {
#pragma omp simd reduction(+ : bs, bt)
          for (int64_t v = v0; v < v1; ++v) {
            const acc_t d = std::max(static_cast<acc_t>(row[v]) * inv_t, LOWEST) - m;
            const acc_t e = std::exp(d);
            bs += e;
            bt += e * d;
          }
        } else {
#pragma omp simd reduction(+ : bs)
          for (int64_t v = v0; v < v1; ++v)
            bs += std::exp(std::max(static_cast<acc_t>(row[v]) * inv_t, LOWEST) - m);
        }
        s += bs;
        t += bt;
      }
      const int64_t y = tgt[n];
      if (y == ignore_index) {
        logp[n] = 0;
        ent[n] = 0;
        lse[n] = s > 0 ? m + std::log(s) : NEG_INF;
        continue;
      }
      const acc_t log_s = s > 0 ? std::log(s) : NEG_INF;
      lse[n] = m + log_s;
      const acc_t zy = static_cast<acc_t>(row[y]) * inv_t;
      // <= 0 by construction; min() only removes rounding above 0.
      logp[n] = s > 0 ? std::min<acc_t>((zy - m) - log_s, 0) : NEG_INF;
      ent[n] = (with_entropy && s > 0) ? std::max<acc_t>(log_s - t / s, 0) : 0;
    }
  });
}

template <typename scalar_t, typename acc_t>
void bwd_rows(const acc_t* g_logp, const acc_t* g_ent, const scalar_t* logits, scalar_t* out,
              int64_t rows, int64_t V, int64_t in_stride, int64_t out_stride, const int64_t* tgt,
              const acc_t* lse, const acc_t* ent, acc_t inv_t, int64_t ignore_index) {
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = logits + n * in_stride;
      scalar_t* orow = out + n * out_stride;
      const int64_t y = tgt[n];
      const acc_t l = lse[n];
      if (y == ignore_index || !std::isfinite(l)) {
        std::fill(orow, orow + V, scalar_t(0));
        continue;
      }
      const acc_t g1 = g_logp ? g_logp[n] : acc_t(0);
      const acc_t g2 = g_ent ? g_ent[n] : acc_t(0);
      const acc_t mu = l - ent[n];  // sum_v p_v z_v
      const acc_t zy = static_cast<acc_t>(row[y]) * inv_t;  // read before `out` may overwrite it
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        const acc_t z = std::max(static_cast<acc_t>(row[v]) * inv_t, LOWEST);
        const acc_t p = std::exp(z - l);
        orow[v] = static_cast<scalar_t>(-p * (g1 + g2 * (z - mu)) * inv_t);
      }
      const acc_t zyc = std::max(zy, LOWEST);
      const acc_t py = std::exp(zyc - l);
      orow[y] = static_cast<scalar_t>((g1 * (1 - py) - g2 * py * (zyc - mu)) * inv_t);
    }
  });
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2, "pyrl: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "pyrl: logits rows must be contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0),
              "pyrl: targets must have shape [N] = [", logits.size(0), "], got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "pyrl: targets must be int64");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& targets_in, double temperature,
    int64_t ignore_index, bool compute_entropy) {
  check_inputs(logits, targets_in);
  const auto targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), N, V, logits.stride(0),
                              targets.const_data_ptr<int64_t>(), acc_t(1.0 / temperature),
                              ignore_index, compute_entropy, logp.mutable_data_ptr<acc_t>(),
                              ent.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
  });
  return {logp, ent, lse};
}

void bwd_into(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
              const at::Tensor& logits, at::Tensor& out, const at::Tensor& targets_in,
              const at::Tensor& lse_in, const at::Tensor& ent_in, double temperature,
              int64_t ignore_index) {
  check_inputs(logits, targets_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto targets = targets_in.contiguous();
  const auto lse = lse_in.to(acc).contiguous();
  const auto ent = ent_in.to(acc).contiguous();
  const auto g1 = grad_logp.to(acc).contiguous();
  at::Tensor g2;
  if (grad_entropy.has_value() && grad_entropy->defined()) g2 = grad_entropy->to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_rows<scalar_t, acc_t>(g1.const_data_ptr<acc_t>(),
                              g2.defined() ? g2.const_data_ptr<acc_t>() : nullptr,
                              logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              N, V, logits.stride(0), out.stride(0),
                              targets.const_data_ptr<int64_t>(), lse.const_data_ptr<acc_t>(),
                              ent.const_data_ptr<acc_t>(), acc_t(1.0 / temperature), ignore_index);
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                            const at::Tensor& ent, double temperature, int64_t ignore_index) {
  auto out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  bwd_into(grad_logp, grad_entropy, logits, out, targets, lse, ent, temperature, ignore_index);
  return out;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const at::Tensor& ent, double temperature, int64_t ignore_index) {
  at::Tensor out = logits;
  bwd_into(grad_logp, grad_entropy, logits, out, targets, lse, ent, temperature, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyrl, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cpu);
}
