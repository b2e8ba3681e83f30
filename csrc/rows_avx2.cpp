// The fp32/fp64 row kernels built with -mavx2 -mfma (see CMakeLists.txt); only called after
// use_avx2_rows() has checked the CPU. Includes nothing but the kernel file and the C library.
#define PYRL_ROWS_ISA isa_avx2
#include "logprobs_rows_impl.h"

namespace pyrl {
namespace isa_avx2 {
PYRL_INSTANTIATE_ROWS(float, float)
PYRL_INSTANTIATE_ROWS(double, double)
PYRL_INSTANTIATE_DIVERGENCE(float)
PYRL_INSTANTIATE_DIVERGENCE(double)
}  // namespace isa_avx2
}  // namespace pyrl
