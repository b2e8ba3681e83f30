// CPU bodies of pyrl::logprobs_fwd / logprobs_bwd(_): per-token log-prob and entropy from logits.
//
// Forward makes ONE pass over each row's vocabulary: blocks of BLOCK logits are max-reduced, the
// running (max m, sum-exp s, sum exp*(z-m) t) are rescaled when the max grows, and the block's
// exponentials are accumulated in a vectorisable loop. Accumulating t relative to the running max
// keeps entropy = log(s) - t/s accurate even for logits of 1e4 (no lse - E[z] cancellation).
// Backward recomputes p = exp(z - lse) from the saved lse; nothing [N, V] is kept in between.
// logprobs_stats gives the same one pass's (m, s, t, zy) for one block of the vocabulary, and the
// backward takes a target id outside [0, V) as "in another block" (softmax and entropy terms only):
// the vocabulary-blocked plan of pyrl/ops/walk.py walks the head block by block with them.
// Rows are split across threads (at::parallel_for: torch's OpenMP pool), so a row's reduction
// order never depends on N or on the other rows: results are batch-invariant bit for bit.
//
// The sampler's truncation (docs/formulas.md §1.1): sampler_cutoff finds each row's kept-set
// threshold tau (top-k by a heap selection, min-p in closed form, top-p by a threshold search or a
// sort), and the optional `tau` of the three ops turns every logit below it into -inf.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "logprobs_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

using pyrl::bwd_rows;
using pyrl::cutoff_rows;
using pyrl::fwd_rows;
using pyrl::stats_rows;

at::ScalarType acc_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The optional per-row thresholds as a contiguous [N] tensor of the accumulation dtype (undefined: none).
at::Tensor thresholds(const std::optional<at::Tensor>& tau, const at::Tensor& logits) {
  if (!tau.has_value() || !tau->defined()) return {};
  TORCH_CHECK(tau->dim() == 1 && tau->size(0) == logits.size(0), "pyrl: tau must have shape [N] = [",
              logits.size(0), "], got ", tau->sizes());
  return tau->to(acc_of(logits)).contiguous();
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2, "pyrl: logits must be 2-D [N, V], got ", logits.sizes());
  // A vocabulary of 1 (or no rows) is contiguous whatever its stride: torch gives such tensors any
  // stride and .contiguous() keeps it, and the kernels never step along the row then.
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1 || logits.size(0) == 0,
              "pyrl: logits rows must be contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0),
              "pyrl: targets must have shape [N] = [", logits.size(0), "], got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "pyrl: targets must be int64");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& targets_in, double temperature,
    int64_t ignore_index, bool compute_entropy, const std::optional<at::Tensor>& tau_in) {
  check_inputs(logits, targets_in);
  const auto targets = targets_in.contiguous();
  const auto tau = thresholds(tau_in, logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), N, V, logits.stride(0),
                              targets.const_data_ptr<int64_t>(), acc_t(1.0 / temperature),
                              ignore_index, compute_entropy, logp.mutable_data_ptr<acc_t>(),
                              ent.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
                              tau.defined() ? tau.const_data_ptr<acc_t>() : nullptr);
  });
  return {logp, ent, lse};
}

// One block of the vocabulary's row summaries (the vocabulary-blocked plan, pyrl/ops/walk.py): the
// caller merges the blocks' (m, s, t, zy) and finishes logp / entropy / lse from them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_stats_cpu(
    const at::Tensor& logits, const at::Tensor& targets_in, double temperature, int64_t ignore_index,
    bool compute_entropy) {
  check_inputs(logits, targets_in);
  const auto targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(acc_of(logits));
  auto m = at::empty({N}, opts), s = at::empty({N}, opts), t = at::empty({N}, opts), zy = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), N, V, logits.stride(0),
                                targets.const_data_ptr<int64_t>(), acc_t(1.0 / temperature), ignore_index,
                                compute_entropy, m.mutable_data_ptr<acc_t>(), s.mutable_data_ptr<acc_t>(),
                                t.mutable_data_ptr<acc_t>(), zy.mutable_data_ptr<acc_t>());
  });
  return {m, s, t, zy};
}

at::Tensor sampler_cutoff_cpu(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,
                              double min_p, bool min_p_first, bool sort_top_p) {
  TORCH_CHECK(logits.dim() == 2, "pyrl: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1 || logits.size(0) == 0,
              "pyrl: logits rows must be contiguous");
  const int64_t N = logits.size(0), V = logits.size(1);
  auto tau = at::empty({N}, logits.options().dtype(acc_of(logits)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sampler_cutoff", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t log_min_p = min_p > 0 ? acc_t(std::log(min_p)) : -std::numeric_limits<acc_t>::infinity();
    cutoff_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), N, V, logits.stride(0), acc_t(1.0 / temperature),
                                 top_k, acc_t(top_p), log_min_p, min_p_first, sort_top_p,
                                 tau.mutable_data_ptr<acc_t>());
  });
  return tau;
}

void bwd_into(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
              const at::Tensor& logits, at::Tensor& out, const at::Tensor& targets_in,
              const at::Tensor& lse_in, const at::Tensor& ent_in, double temperature,
              int64_t ignore_index, const std::optional<at::Tensor>& tau_in) {
  check_inputs(logits, targets_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = acc_of(logits);
  const auto tau = thresholds(tau_in, logits);
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
                              ent.const_data_ptr<acc_t>(), acc_t(1.0 / temperature), ignore_index,
                              tau.defined() ? tau.const_data_ptr<acc_t>() : nullptr);
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                            const at::Tensor& ent, double temperature, int64_t ignore_index,
                            const std::optional<at::Tensor>& tau) {
  auto out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  bwd_into(grad_logp, grad_entropy, logits, out, targets, lse, ent, temperature, ignore_index, tau);
  return out;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const at::Tensor& ent, double temperature, int64_t ignore_index,
                              const std::optional<at::Tensor>& tau) {
  at::Tensor out = logits;
  bwd_into(grad_logp, grad_entropy, logits, out, targets, lse, ent, temperature, ignore_index, tau);
}

at::Tensor divergence_rows_inplace_cpu(const at::Tensor& zs, const at::Tensor& zt, const std::optional<at::Tensor>& grad,
                                       double temperature, int64_t kind, double beta) {
  TORCH_CHECK(zs.dim() == 2 && zt.sizes() == zs.sizes(), "pyrl: z_student and z_teacher must both be [N, V], got ",
              zs.sizes(), " and ", zt.sizes());
  TORCH_CHECK(zs.scalar_type() == zt.scalar_type() && (zs.scalar_type() == at::kFloat || zs.scalar_type() == at::kDouble),
              "pyrl: divergence_rows_ takes fp32 or fp64 logits of one dtype, got ", zs.scalar_type(), " and ",
              zt.scalar_type());
  const int64_t N = zs.size(0), V = zs.size(1);
  TORCH_CHECK((zs.stride(1) == 1 || V <= 1 || N == 0) && (zt.stride(1) == 1 || V <= 1 || N == 0),
              "pyrl: logits rows must be contiguous");
  TORCH_CHECK(kind >= 0 && kind <= 2, "pyrl: kind must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", kind);
  TORCH_CHECK(temperature > 0, "pyrl: temperature must be > 0, got ", temperature);
  at::Tensor g;
  if (grad.has_value() && grad->defined()) {
    TORCH_CHECK(grad->dim() == 1 && grad->size(0) == N, "pyrl: grad must have shape [N] = [", N, "], got ",
                grad->sizes());
    g = grad->to(zs.scalar_type()).contiguous();
  }
  auto value = at::empty({N}, zs.options());
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "divergence_rows_", [&] {
    pyrl::divergence_rows<scalar_t>(zs.mutable_data_ptr<scalar_t>(), zt.mutable_data_ptr<scalar_t>(), N, V,
                                    zs.stride(0), zt.stride(0), g.defined() ? g.const_data_ptr<scalar_t>() : nullptr,
                                    scalar_t(1.0 / temperature), kind, scalar_t(beta), value.mutable_data_ptr<scalar_t>());
  });
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyrl, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cpu);
  m.impl("sampler_cutoff", &sampler_cutoff_cpu);
  m.impl("logprobs_stats", &logprobs_stats_cpu);
  m.impl("divergence_rows_", &divergence_rows_inplace_cpu);
}
