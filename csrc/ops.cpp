// Schemas of every pyrl op, their fake (Meta) kernels for torch.compile / FSDP tracing, and the
// Python module `pyrl._C`, which only carries build information: the ops themselves are reached
// through `torch.ops.pyrl.<name>`. Per-family files register the CPU (and CUDA) bodies.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>
#include <pybind11/pybind11.h>

#include <string>

TORCH_LIBRARY(pyrl, m) {
  // logits [N, V] (any float dtype) -> logp, entropy, lse: [N] in fp32 (fp64 for fp64 input).
  // z = logits / temperature; rows whose target equals ignore_index give 0.
  m.def(
      "logprobs_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index, "
      "bool compute_entropy) -> (Tensor logp, Tensor entropy, Tensor lse)");
  // d loss / d logits, in the dtype of logits. grad_entropy may be None.
  m.def(
      "logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor targets, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  // The same, written over `logits` (saves an [N, V] buffer when the caller no longer needs it).
  m.def(
      "logprobs_bwd_(Tensor grad_logp, Tensor? grad_entropy, Tensor(a!) logits, Tensor targets, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> ()");
  // hidden [N, H], weight [V, H] -> logp, entropy, lse [N]; tokens in chunks of chunk_rows, so at
  // most [chunk_rows, V] logits exist at a time.
  m.def(
      "fused_linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "float temperature, int ignore_index, bool compute_entropy, int chunk_rows) "
      "-> (Tensor logp, Tensor entropy, Tensor lse)");
  // -> d_hidden, d_weight, d_bias; a gradient that is not needed comes back as an empty [0] tensor.
  m.def(
      "fused_linear_logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index, "
      "int chunk_rows, bool need_hidden, bool need_weight, bool need_bias) "
      "-> (Tensor d_hidden, Tensor d_weight, Tensor d_bias)");
}

namespace {

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_meta(
    const at::Tensor& logits, const at::Tensor& targets, double, int64_t, bool) {
  auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  auto n = logits.sym_size(0);
  return {at::empty_symint({n}, opts), at::empty_symint({n}, opts), at::empty_symint({n}, opts)};
}

at::Tensor logprobs_bwd_meta(const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor& logits, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, int64_t) {
  return at::empty_like(logits);
}

void logprobs_bwd_inplace_meta(const at::Tensor&, const std::optional<at::Tensor>&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, int64_t) {}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_fwd_meta(
    const at::Tensor& hidden, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double,
    int64_t, bool, int64_t) {
  auto opts = hidden.options().dtype(acc_type(hidden.scalar_type()));
  auto n = hidden.sym_size(0);
  return {at::empty_symint({n}, opts), at::empty_symint({n}, opts), at::empty_symint({n}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_bwd_meta(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
    int64_t, int64_t, bool need_hidden, bool need_weight, bool need_bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  return {need_hidden ? at::empty_like(hidden) : at::empty({0}, hidden.options()),
          need_weight ? at::empty_like(weight) : at::empty({0}, weight.options()),
          need_bias && has_bias ? at::empty_like(*bias) : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyrl, Meta, m) {
  m.impl("fused_linear_logprobs_fwd", &fused_linear_logprobs_fwd_meta);
  m.impl("fused_linear_logprobs_bwd", &fused_linear_logprobs_bwd_meta);
  m.impl("logprobs_fwd", &logprobs_fwd_meta);
  m.impl("logprobs_bwd", &logprobs_bwd_meta);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_meta);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyrl compiled kernels; the ops live in torch.ops.pyrl";
#ifdef PYRL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = std::string(PYRL_TORCH_VERSION);
  m.def("parallel_info", []() { return at::get_parallel_info(); },
        "ATen's description of the thread pool the CPU kernels run on");
}
