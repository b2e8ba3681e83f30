// The fp32/fp64 row kernels built with -mavx2 -mfma (see CMakeLists.txt); only called after
// use_avx2_rows() has checked the CPU. Includes nothing but the kernel file and the C library.
#define PYRL_ROWS_ISA isa_avx2
#include "logprobs_rows_impl.h"

namespace pyrl {
namespace isa_avx2 {
#define PYRL_INSTANTIATE(S, A)                                                                                   \
  template void fwd_rows<S, A>(int64_t, int64_t, const S*, int64_t, int64_t, const int64_t*, A, int64_t, bool,  \
                               A*, A*, A*);                                                                      \
  template void bwd_rows<S, A>(int64_t, int64_t, const A*, const A*, const S*, S*, int64_t, int64_t, int64_t,   \
                               const int64_t*, const A*, const A*, A, int64_t);
PYRL_INSTANTIATE(float, float)
PYRL_INSTANTIATE(double, double)
#undef PYRL_INSTANTIATE
}  // namespace isa_avx2
}  // namespace pyrl
