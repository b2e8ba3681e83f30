// Row bodies shared by the C++ log-prob ops (csrc/logprobs_cpu.cpp) and the chunked fused-linear
// ops (csrc/fused_linear_cpu.cpp). See logprobs_cpu.cpp for the algorithm.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace pyrl {
constexpr int64_t BLOCK = 2048;

template <typename scalar_t, typename acc_t>
inline void fwd_rows(const scalar_t* logits, int64_t rows, int64_t V, int64_t stride, const int64_t* tgt,
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
inline void bwd_rows(const acc_t* g_logp, const acc_t* g_ent, const scalar_t* logits, scalar_t* out,
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

}  // namespace pyrl
