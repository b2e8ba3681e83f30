// The row kernels built with the default flags, for every input dtype; and the AVX2 check.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define PYRL_ROWS_ISA isa_base
#include "logprobs_rows_impl.h"
#include "logprobs_rows.h"

namespace pyrl {
namespace isa_base {
PYRL_INSTANTIATE_ROWS(float, float)
PYRL_INSTANTIATE_ROWS(double, double)
PYRL_INSTANTIATE_DIVERGENCE(float)
PYRL_INSTANTIATE_DIVERGENCE(double)
PYRL_INSTANTIATE_ROWS(c10::BFloat16, float)
PYRL_INSTANTIATE_ROWS(c10::Half, float)
}  // namespace isa_base

bool use_avx2_rows() {
#if defined(PYRL_HAVE_AVX2_ROWS) && (defined(__x86_64__) || defined(_M_X64))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}
}  // namespace pyrl
