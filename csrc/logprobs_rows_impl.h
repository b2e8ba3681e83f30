// The row kernels themselves, compiled once per instruction set: csrc/rows_base.cpp (the build's
// default flags) and csrc/rows_avx2.cpp (-mavx2 -mfma on x86-64), each defining PYRL_ROWS_ISA to its
// own namespace. Only this file's code is compiled with AVX2, and its helpers have internal
// linkage, so no AVX2 copy of a shared inline function can leak into the default path.
// Algorithm: see csrc/logprobs_cpu.cpp.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifndef PYRL_ROWS_ISA
#error "define PYRL_ROWS_ISA before including logprobs_rows_impl.h"
#endif

namespace pyrl {
namespace PYRL_ROWS_ISA {
namespace {

constexpr int64_t BLOCK = 2048;

template <typename T>
inline T max_(T a, T b) { return a > b ? a : b; }
template <typename T>
inline T min_(T a, T b) { return a < b ? a : b; }

// exp for float in plain arithmetic (Cephes-style: 2^n * poly(r), |r| <= ln2/2, max relative error
// ~1e-7), so loops over it vectorise without -ffast-math (which would break our -inf handling).
// Arguments below -87 give exactly 0; every call site passes values <= ~0 (z - max, z - lse).
inline float vexp(float x) {
  const bool tiny = x < -87.0f;
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : p * scale;
}
// fp64 is the accuracy path (gradcheck, references): libm's exp.
inline double vexp(double x) { return std::exp(x); }

}  // namespace

template <typename scalar_t, typename acc_t>
void fwd_rows(int64_t begin, int64_t end, const scalar_t* logits, int64_t V, int64_t stride, const int64_t* tgt,
              acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* logp, acc_t* ent, acc_t* lse) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  // -inf logits are clamped to the lowest finite value inside the sums: exp() gives exactly 0 and
  // 0 * finite stays 0, where 0 * -inf would be NaN.
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = logits + n * stride;
      acc_t m = NEG_INF, s = 0, t = 0;
      for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
        const int64_t v1 = min_(V, v0 + BLOCK);
        acc_t bm = NEG_INF;
#pragma omp simd reduction(max : bm)
        for (int64_t v = v0; v < v1; ++v) {
          const acc_t x = static_cast<acc_t>(row[v]);
          bm = x > bm ? x : bm;
        }
        bm *= inv_t;
        if (!(bm > NEG_INF)) continue;  // block entirely -inf: contributes nothing
        if (bm > m) {
          if (s > 0) {
            const acc_t sc = vexp(m - bm);
            t = sc * (t + s * (m - bm));
            s *= sc;
          }
          m = bm;
        }
        acc_t bs = 0, bt = 0;
        if (with_entropy) {
#pragma omp simd reduction(+ : bs, bt)
          for (int64_t v = v0; v < v1; ++v) {
            const acc_t d = max_(static_cast<acc_t>(row[v]) * inv_t, LOWEST) - m;
            const acc_t e = vexp(d);
            bs += e;
            bt += e * d;
          }
        } else {
#pragma omp simd reduction(+ : bs)
          for (int64_t v = v0; v < v1; ++v)
            bs += vexp(max_(static_cast<acc_t>(row[v]) * inv_t, LOWEST) - m);
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
      logp[n] = s > 0 ? min_<acc_t>((zy - m) - log_s, 0) : NEG_INF;
      ent[n] = (with_entropy && s > 0) ? max_<acc_t>(log_s - t / s, 0) : 0;
    }
  }
}

template <typename scalar_t, typename acc_t>
void bwd_rows(int64_t begin, int64_t end, const acc_t* g_logp, const acc_t* g_ent, const scalar_t* logits,
              scalar_t* out, int64_t V, int64_t in_stride, int64_t out_stride, const int64_t* tgt,
              const acc_t* lse, const acc_t* ent, acc_t inv_t, int64_t ignore_index) {
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = logits + n * in_stride;
      scalar_t* orow = out + n * out_stride;
      const int64_t y = tgt[n];
      const acc_t l = lse[n];
      if (y == ignore_index || !(l - l == 0)) {
        for (int64_t v = 0; v < V; ++v) orow[v] = scalar_t(0);
        continue;
      }
      const acc_t g1 = g_logp ? g_logp[n] : acc_t(0);
      const acc_t g2 = g_ent ? g_ent[n] : acc_t(0);
      const acc_t mu = l - ent[n];  // sum_v p_v z_v
      const acc_t zy = static_cast<acc_t>(row[y]) * inv_t;  // read before `out` may overwrite it
      const acc_t a = -g1 * inv_t, c = -g2 * inv_t;
      acc_t buf[BLOCK];  // computing into a local block first lets GCC vectorise the exp loop
      for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
        const int64_t len = min_(BLOCK, V - v0);
        const scalar_t* in = row + v0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const acc_t zr = static_cast<acc_t>(in[i]) * inv_t;
          const acc_t z = zr > LOWEST ? zr : LOWEST;
          // (e * c) * (z - mu), not e * (c * (z - mu)): at a -inf logit z is the lowest finite
          // value, e = 0, and c * (z - mu) may overflow to inf (0 * inf = NaN).
          const acc_t e = vexp(z - l);
          buf[i] = e * a + (e * c) * (z - mu);
        }
        scalar_t* out_block = orow + v0;
        for (int64_t i = 0; i < len; ++i) out_block[i] = static_cast<scalar_t>(buf[i]);
      }
      const acc_t zyc = max_(zy, LOWEST);
      const acc_t py = vexp(zyc - l);
      orow[y] = static_cast<scalar_t>((g1 * (1 - py) - g2 * py * (zyc - mu)) * inv_t);
    }
  }
}


}  // namespace PYRL_ROWS_ISA
}  // namespace pyrl

// Explicit instantiation of both kernels for one (input, accumulation) dtype pair, used by each
// ISA's translation unit inside its own namespace.
#define PYRL_INSTANTIATE_ROWS(S, A)                                                                              \
  template void fwd_rows<S, A>(int64_t, int64_t, const S*, int64_t, int64_t, const int64_t*, A, int64_t, bool,  \
                               A*, A*, A*);                                                                      \
  template void bwd_rows<S, A>(int64_t, int64_t, const A*, const A*, const S*, S*, int64_t, int64_t, int64_t,   \
                               const int64_t*, const A*, const A*, A, int64_t);
