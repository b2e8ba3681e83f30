// Row bodies of the C++ log-prob ops (csrc/logprobs_cpu.cpp), which the chunk walk
// (pyrl/ops/walk.py) runs on each chunk's logits: rows are spread over torch's thread pool here, and each range
// of rows runs the kernel compiled for the best instruction set the CPU has (AVX2+FMA on x86-64
// when present, the build's default otherwise). Algorithm: see csrc/logprobs_cpu.cpp.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace pyrl {

#define PYRL_DECLARE_ROWS(ns)                                                                          \
  namespace ns {                                                                                        \
  template <typename scalar_t, typename acc_t>                                                          \
  void fwd_rows(int64_t begin, int64_t end, const scalar_t* logits, int64_t V, int64_t stride,          \
                const int64_t* tgt, acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* logp,   \
                acc_t* ent, acc_t* lse, const acc_t* tau);                                               \
  template <typename scalar_t, typename acc_t>                                                          \
  void stats_rows(int64_t begin, int64_t end, const scalar_t* logits, int64_t V, int64_t stride,        \
                  const int64_t* tgt, acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* m,    \
                  acc_t* s, acc_t* t, acc_t* zy);                                                        \
  template <typename scalar_t, typename acc_t>                                                          \
  void bwd_rows(int64_t begin, int64_t end, const acc_t* g_logp, const acc_t* g_ent,                    \
                const scalar_t* logits, scalar_t* out, int64_t V, int64_t in_stride, int64_t out_stride, \
                const int64_t* tgt, const acc_t* lse, const acc_t* ent, acc_t inv_t,                    \
                int64_t ignore_index, const acc_t* tau);                                                 \
  template <typename scalar_t, typename acc_t>                                                          \
  void cutoff_rows(int64_t begin, int64_t end, const scalar_t* logits, int64_t V, int64_t stride,        \
                   acc_t inv_t, int64_t top_k, acc_t top_p, acc_t log_min_p, bool min_p_first,           \
                   bool sort_top_p, acc_t* tau, acc_t* scratch);                                         \
  template <typename acc_t>                                                                             \
  void divergence_rows(int64_t begin, int64_t end, acc_t* zs, acc_t* zt, int64_t V, int64_t s_stride,   \
                       int64_t t_stride, const acc_t* g, acc_t inv_t, int64_t kind, acc_t beta,         \
                       acc_t* value);                                                                    \
  }
PYRL_DECLARE_ROWS(isa_base)   // every dtype (csrc/rows_base.cpp)
PYRL_DECLARE_ROWS(isa_avx2)   // fp32 and fp64 only (csrc/rows_avx2.cpp)
#undef PYRL_DECLARE_ROWS

// True when the AVX2 build of the kernels exists and this CPU runs it (checked once).
bool use_avx2_rows();

// tau: per-row kept-set thresholds of the sampler's truncation (nullptr: every token kept).
template <typename scalar_t, typename acc_t>
inline void fwd_rows(const scalar_t* logits, int64_t rows, int64_t V, int64_t stride, const int64_t* tgt,
                     acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* logp, acc_t* ent, acc_t* lse,
                     const acc_t* tau) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (use_avx2_rows())
        return isa_avx2::fwd_rows<scalar_t, acc_t>(begin, end, logits, V, stride, tgt, inv_t, ignore_index,
                                                   with_entropy, logp, ent, lse, tau);
    }
    isa_base::fwd_rows<scalar_t, acc_t>(begin, end, logits, V, stride, tgt, inv_t, ignore_index, with_entropy,
                                        logp, ent, lse, tau);
  });
}

// Per-row (m, s, t, zy) of a block of the vocabulary (targets outside [0, V) lie in another block).
template <typename scalar_t, typename acc_t>
inline void stats_rows(const scalar_t* logits, int64_t rows, int64_t V, int64_t stride, const int64_t* tgt,
                       acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* m, acc_t* s, acc_t* t, acc_t* zy) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (use_avx2_rows())
        return isa_avx2::stats_rows<scalar_t, acc_t>(begin, end, logits, V, stride, tgt, inv_t, ignore_index,
                                                     with_entropy, m, s, t, zy);
    }
    isa_base::stats_rows<scalar_t, acc_t>(begin, end, logits, V, stride, tgt, inv_t, ignore_index, with_entropy, m,
                                          s, t, zy);
  });
}

// The kept-set thresholds: top_k <= 0, top_p >= 1 and log_min_p = -inf switch a truncation off.
template <typename scalar_t, typename acc_t>
inline void cutoff_rows(const scalar_t* logits, int64_t rows, int64_t V, int64_t stride, acc_t inv_t, int64_t top_k,
                        acc_t top_p, acc_t log_min_p, bool min_p_first, bool sort_top_p, acc_t* tau) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    // scratch is allocated here, in code built with the default flags (no AVX2 copy of std::vector)
    std::vector<acc_t> scratch(2 * V + (top_k > 0 && top_k < V ? top_k : 0));
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (use_avx2_rows())
        return isa_avx2::cutoff_rows<scalar_t, acc_t>(begin, end, logits, V, stride, inv_t, top_k, top_p, log_min_p,
                                                      min_p_first, sort_top_p, tau, scratch.data());
    }
    isa_base::cutoff_rows<scalar_t, acc_t>(begin, end, logits, V, stride, inv_t, top_k, top_p, log_min_p, min_p_first,
                                           sort_top_p, tau, scratch.data());
  });
}

template <typename scalar_t, typename acc_t>
inline void bwd_rows(const acc_t* g_logp, const acc_t* g_ent, const scalar_t* logits, scalar_t* out, int64_t rows,
                     int64_t V, int64_t in_stride, int64_t out_stride, const int64_t* tgt, const acc_t* lse,
                     const acc_t* ent, acc_t inv_t, int64_t ignore_index, const acc_t* tau) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (use_avx2_rows())
        return isa_avx2::bwd_rows<scalar_t, acc_t>(begin, end, g_logp, g_ent, logits, out, V, in_stride,
                                                   out_stride, tgt, lse, ent, inv_t, ignore_index, tau);
    }
    isa_base::bwd_rows<scalar_t, acc_t>(begin, end, g_logp, g_ent, logits, out, V, in_stride, out_stride, tgt, lse,
                                        ent, inv_t, ignore_index, tau);
  });
}

// The divergence between two heads' rows (forward KL, reverse KL, JSD): values [rows], and with g
// the student's rows overwritten by g * d value / d z_s (the teacher's rows are then scratch).
template <typename acc_t>
inline void divergence_rows(acc_t* zs, acc_t* zt, int64_t rows, int64_t V, int64_t s_stride, int64_t t_stride,
                            const acc_t* g, acc_t inv_t, int64_t kind, acc_t beta, acc_t* value) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    if (use_avx2_rows())
      return isa_avx2::divergence_rows<acc_t>(begin, end, zs, zt, V, s_stride, t_stride, g, inv_t, kind, beta, value);
    isa_base::divergence_rows<acc_t>(begin, end, zs, zt, V, s_stride, t_stride, g, inv_t, kind, beta, value);
  });
}

}  // namespace pyrl
