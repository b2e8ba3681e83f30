// Schemas of every pyrl op, their fake (Meta) kernels for torch.compile / FSDP tracing, and the
// Python module `pyrl._C`, which only carries build information: the ops themselves are reached
// through `torch.ops.pyrl.<name>`. csrc/logprobs_cpu.cpp registers the CPU bodies: the row kernels
// of the chunk walk, which Python owns (pyrl/ops/walk.py) on every device.
#include <torch/library.h>
#include <torch/torch.h>
#include <pybind11/pybind11.h>

#include <string>

TORCH_LIBRARY(pyrl, m) {
  // logits [N, V] (any float dtype) -> logp, entropy, lse: [N] in fp32 (fp64 for fp64 input).
  // z = logits / temperature; rows whose target equals ignore_index give 0. tau [N] (optional):
  // the sampler's kept-set thresholds, z < tau counts as -inf (docs/formulas.md §1.1).
  m.def(
      "logprobs_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index, "
      "bool compute_entropy, Tensor? tau=None) -> (Tensor logp, Tensor entropy, Tensor lse)");
  // d loss / d logits, in the dtype of logits. grad_entropy may be None. A target id outside [0, V)
  // (not ignore_index) lies in another block of the vocabulary: no one-hot term here.
  m.def(
      "logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor targets, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index, Tensor? tau=None) -> Tensor");
  // The same, written over `logits` (saves an [N, V] buffer when the caller no longer needs it).
  m.def(
      "logprobs_bwd_(Tensor grad_logp, Tensor? grad_entropy, Tensor(a!) logits, Tensor targets, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index, Tensor? tau=None) -> ()");
  // One block of the vocabulary: per-row max m, s = sum exp(z - m), t = sum exp(z - m) (z - m) and zy,
  // the target's scaled logit where the target lies in [0, V) (else 0), all in the accumulation dtype.
  m.def(
      "logprobs_stats(Tensor logits, Tensor targets, float temperature, int ignore_index, "
      "bool compute_entropy) -> (Tensor m, Tensor s, Tensor t, Tensor zy)");
  // The per-row kept-set thresholds tau [N] of the sampler's truncation (accumulation dtype):
  // top_k <= 0, top_p >= 1, min_p <= 0 switch each off; min_p_first: vLLM v1's order;
  // sort_top_p: find the top-p threshold by sorting the row instead of the threshold search.
  m.def(
      "sampler_cutoff(Tensor logits, float temperature, int top_k, float top_p, float min_p, "
      "bool min_p_first, bool sort_top_p) -> Tensor");
  // The per-row divergence between a student's and a teacher's logits [N, V] (fp32 or fp64, the
  // same dtype) at `temperature` (docs/formulas.md §14): kind 0 forward KL(q || p), 1 reverse
  // KL(p || q), 2 the generalised JSD with teacher weight beta. Returns value [N]; with grad [N]
  // the student's logits are overwritten by grad * d value / d z_student and the teacher's are
  // left as scratch (without grad neither is written).
  m.def(
      "divergence_rows_(Tensor(a!) z_student, Tensor(b!) z_teacher, Tensor? grad, float temperature, int kind, "
      "float beta) -> Tensor");
}

namespace {

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_meta(
    const at::Tensor& logits, const at::Tensor& targets, double, int64_t, bool, const std::optional<at::Tensor>&) {
  auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  auto n = logits.sym_size(0);
  return {at::empty_symint({n}, opts), at::empty_symint({n}, opts), at::empty_symint({n}, opts)};
}

at::Tensor logprobs_bwd_meta(const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor& logits, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, int64_t, const std::optional<at::Tensor>&) {
  return at::empty_like(logits);
}

void logprobs_bwd_inplace_meta(const at::Tensor&, const std::optional<at::Tensor>&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, int64_t, const std::optional<at::Tensor>&) {}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_stats_meta(
    const at::Tensor& logits, const at::Tensor&, double, int64_t, bool) {
  auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  auto n = logits.sym_size(0);
  return {at::empty_symint({n}, opts), at::empty_symint({n}, opts), at::empty_symint({n}, opts),
          at::empty_symint({n}, opts)};
}

at::Tensor sampler_cutoff_meta(const at::Tensor& logits, double, int64_t, double, double, bool, bool) {
  return at::empty_symint({logits.sym_size(0)}, logits.options().dtype(acc_type(logits.scalar_type())));
}

at::Tensor divergence_rows_meta(const at::Tensor& zs, const at::Tensor&, const std::optional<at::Tensor>&, double,
                                int64_t, double) {
  return at::empty_symint({zs.sym_size(0)}, zs.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyrl, Meta, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_meta);
  m.impl("logprobs_bwd", &logprobs_bwd_meta);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_meta);
  m.impl("sampler_cutoff", &sampler_cutoff_meta);
  m.impl("logprobs_stats", &logprobs_stats_meta);
  m.impl("divergence_rows_", &divergence_rows_meta);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyrl compiled kernels; the ops live in torch.ops.pyrl";
  m.attr("torch_version") = std::string(PYRL_TORCH_VERSION);
}
