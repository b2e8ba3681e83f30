// CPU bodies of pyrl::fused_linear_logprobs_fwd / _bwd: log-prob and entropy straight from hidden
// states and the LM head, chunked over tokens.
//
// Each chunk of `chunk_rows` tokens gets its logits [chunk, V] from one ATen GEMM (BLAS), the row
// statistics from the one-pass row kernel (logprobs_rows.h), and is then dropped: peak extra memory
// is one chunk of fp32 logits, never [N, V]. Backward recomputes the chunk's logits, overwrites them
// with d logits in place, and feeds the two gradient GEMMs; d_weight/d_bias accumulate in fp32.
// The loop lives here rather than in Python so the whole op is one node for torch.compile.
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "logprobs_rows.h"

namespace {

at::ScalarType acc_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Every logits GEMM runs on a multiple of kGemmRowQuantum rows (the last chunk is zero-padded): a
// BLAS may round a row of h @ W.T differently depending on the number of rows of the call (MKL
// does when it is not a multiple of 4), which would make a token's log-prob depend on its batch.
// Keep equal to GEMM_ROW_QUANTUM in pyrl/ops/logprobs.py.
constexpr int64_t kGemmRowQuantum = 16;

// h [c, H] -> the padded logits buffer [c', V], c' = c rounded up to kGemmRowQuantum; its first c
// rows are the chunk's logits (contiguous).
at::Tensor padded_chunk_logits(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const int64_t pad = (kGemmRowQuantum - h.size(0) % kGemmRowQuantum) % kGemmRowQuantum;
  const auto hp = pad ? at::cat({h, at::zeros({pad, h.size(1)}, h.options())}) : h;
  return b.has_value() ? at::addmm(*b, hp, w.t()) : at::mm(hp, w.t());
}

void check(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "pyrl: hidden [N, H] and weight [V, H] expected, got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "pyrl: targets must be int64 [N]");
  TORCH_CHECK(chunk_rows > 0, "pyrl: chunk_rows must be > 0");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets_in, double temperature, int64_t ignore_index, bool compute_entropy,
    int64_t chunk_rows) {
  check(hidden, weight, targets_in, chunk_rows);
  const auto acc = acc_of(hidden);
  const auto targets = targets_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto w = weight.to(acc);
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(acc);
  auto opts = hidden.options().dtype(acc);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  for (int64_t s = 0; s < N; s += chunk_rows) {
    const int64_t c = std::min(chunk_rows, N - s);
    const auto logits = padded_chunk_logits(hidden.narrow(0, s, c).to(acc), w, b);
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fused_linear_logprobs_fwd", [&] {
      pyrl::fwd_rows<scalar_t, scalar_t>(logits.const_data_ptr<scalar_t>(), c, V, logits.stride(0),
                                         targets.const_data_ptr<int64_t>() + s, scalar_t(1.0 / temperature),
                                         ignore_index, compute_entropy, logp.mutable_data_ptr<scalar_t>() + s,
                                         ent.mutable_data_ptr<scalar_t>() + s, lse.mutable_data_ptr<scalar_t>() + s);
    });
  }
  return {logp, ent, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets_in,
    const at::Tensor& lse_in, const at::Tensor& ent_in, double temperature, int64_t ignore_index,
    int64_t chunk_rows, bool need_hidden, bool need_weight, bool need_bias) {
  check(hidden, weight, targets_in, chunk_rows);
  const auto acc = acc_of(hidden);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  need_bias = need_bias && has_bias;
  const auto targets = targets_in.contiguous();
  const auto lse = lse_in.to(acc).contiguous(), ent = ent_in.to(acc).contiguous();
  const auto g1 = grad_logp.to(acc).contiguous();
  at::Tensor g2;
  if (grad_entropy.has_value() && grad_entropy->defined()) g2 = grad_entropy->to(acc).contiguous();
  const auto w = weight.to(acc);
  std::optional<at::Tensor> b;
  if (has_bias) b = bias->to(acc);

  auto d_hidden = need_hidden ? at::zeros_like(hidden) : at::empty({0}, hidden.options());
  // Accumulate straight into the result when it is already fp32/fp64; else into an fp32 buffer.
  auto d_weight = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(acc)) : at::empty({0}, weight.options());
  auto d_bias = need_bias ? at::zeros({V}, weight.options().dtype(acc)) : at::empty({0}, weight.options());
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < N; s += chunk_rows) {
    const int64_t c = std::min(chunk_rows, N - s);
    if (std::all_of(tgt + s, tgt + s + c, [&](int64_t y) { return y == ignore_index; })) continue;  // zero grad
    const auto h = hidden.narrow(0, s, c).to(acc);
    auto full = padded_chunk_logits(h, w, b);  // [c', V]: rows past c are padding
    auto dz = full.narrow(0, 0, c);
    AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "fused_linear_logprobs_bwd", [&] {
      scalar_t* p = dz.mutable_data_ptr<scalar_t>();
      pyrl::bwd_rows<scalar_t, scalar_t>(g1.const_data_ptr<scalar_t>() + s,
                                         g2.defined() ? g2.const_data_ptr<scalar_t>() + s : nullptr, p, p, c, V,
                                         dz.stride(0), dz.stride(0), tgt + s, lse.const_data_ptr<scalar_t>() + s,
                                         ent.const_data_ptr<scalar_t>() + s, scalar_t(1.0 / temperature),
                                         ignore_index);
    });
    if (need_hidden) {
      // The GEMM runs over the padded rows too (zeroed), for the same reason as the logits GEMM.
      if (full.size(0) != c) full.narrow(0, c, full.size(0) - c).zero_();
      // As (W.T @ full.T).T: with few rows and a large V the BLAS streams W faster in this layout.
      d_hidden.narrow(0, s, c).copy_(at::mm(w.t(), full.t()).t().narrow(0, 0, c));
    }
    if (need_weight) d_weight.addmm_(dz.t(), h);
    if (need_bias) d_bias.add_(dz.sum(0));
  }
  if (need_weight) d_weight = d_weight.to(weight.scalar_type());
  if (need_bias) d_bias = d_bias.to(bias->scalar_type());
  return {d_hidden, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyrl, CPU, m) {
  m.impl("fused_linear_logprobs_fwd", &fused_linear_logprobs_fwd_cpu);
  m.impl("fused_linear_logprobs_bwd", &fused_linear_logprobs_bwd_cpu);
}
