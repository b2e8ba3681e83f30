// The row kernels built with the default flags, for every input dtype; and the AVX2 check.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define PYRL_ROWS_ISA isa_base
#include "logprobs_rows_impl.h"
#include "logprobs_rows.h"

namespace pyrl {
namespace isa_base {
#define PYRL_INSTANTIATE(S, A)                                                                                   \
  template void fwd_rows<S, A>(int64_t, int64_t, const S*, int64_t, int64_t, const int64_t*, A, int64_t, bool,  \
                               A*, A*, A*);                                                                      \
  template void bwd_rows<S, A>(int64_t, int64_t, const A*, const A*, const S*, S*, int64_t, int64_t, int64_t,   \
                               const int64_t*, const A*, const A*, A, int64_t);
PYRL_INSTANTIATE(float, float)
PYRL_INSTANTIATE(double, double)
PYRL_INSTANTIATE(c10::BFloat16, float)
PYRL_INSTANTIATE(c10::Half, float)
#undef PYRL_INSTANTIATE
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
