// The row kernels themselves, compiled once per instruction set: csrc/rows_base.cpp (the build's
// default flags) and csrc/rows_avx2.cpp (-mavx2 -mfma on x86-64), each defining PYRL_ROWS_ISA to its
// own namespace. Only this file's code is compiled with AVX2, and its helpers have internal
// linkage, so no AVX2 copy of a shared inline function can leak into the default path.
// Algorithm: see csrc/logprobs_cpu.cpp.
#include <algorithm>
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

// A row's scaled logit; with CUT (the sampler truncates, docs/formulas.md §1.1) -inf below the
// row's kept-set threshold, so every sum below runs over the kept tokens only.
template <bool CUT, typename scalar_t, typename acc_t>
inline acc_t scaled(scalar_t x, acc_t inv_t, acc_t thr) {
  const acc_t z = static_cast<acc_t>(x) * inv_t;
  if constexpr (CUT) return z >= thr ? z : -std::numeric_limits<acc_t>::infinity();
  return z;
}

// A row's summaries (m, s, t; t relative to m), the one pass over its vocabulary described in
// csrc/logprobs_cpu.cpp. The row may be one block of a longer vocabulary (the vocabulary-blocked plan).
template <bool CUT, typename scalar_t, typename acc_t>
void stats_row(const scalar_t* row, int64_t V, acc_t inv_t, acc_t thr, bool with_entropy, acc_t& m_out, acc_t& s_out,
               acc_t& t_out) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  // -inf logits are clamped to the lowest finite value inside the sums: exp() gives exactly 0 and
  // 0 * finite stays 0, where 0 * -inf would be NaN.
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  acc_t m = NEG_INF, s = 0, t = 0;
  for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
    const int64_t v1 = min_(V, v0 + BLOCK);
    acc_t bm = NEG_INF;
#pragma omp simd reduction(max : bm)
    for (int64_t v = v0; v < v1; ++v) {
      const acc_t x = CUT ? scaled<true>(row[v], inv_t, thr) : static_cast<acc_t>(row[v]);
      bm = x > bm ? x : bm;
    }
    if (!CUT) bm *= inv_t;
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
        const acc_t d = max_(scaled<CUT>(row[v], inv_t, thr), LOWEST) - m;
        const acc_t e = vexp(d);
        bs += e;
        bt += e * d;
      }
    } else {
#pragma omp simd reduction(+ : bs)
      for (int64_t v = v0; v < v1; ++v) bs += vexp(max_(scaled<CUT>(row[v], inv_t, thr), LOWEST) - m);
    }
    s += bs;
    t += bt;
  }
  m_out = m;
  s_out = s;
  t_out = t;
}

template <bool CUT, typename scalar_t, typename acc_t>
void fwd_row(const scalar_t* row, int64_t V, int64_t y, acc_t inv_t, acc_t thr, int64_t ignore_index,
             bool with_entropy, acc_t* logp, acc_t* ent, acc_t* lse) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  acc_t m, s, t;
  stats_row<CUT>(row, V, inv_t, thr, with_entropy, m, s, t);
  if (y == ignore_index) {
    *logp = 0;
    *ent = 0;
    *lse = s > 0 ? m + std::log(s) : NEG_INF;
    return;
  }
  const acc_t log_s = s > 0 ? std::log(s) : NEG_INF;
  *lse = m + log_s;
  const acc_t zy = scaled<CUT>(row[y], inv_t, thr);  // -inf outside the kept set: logp = -inf
  // <= 0 by construction; min() only removes rounding above 0.
  *logp = s > 0 ? min_<acc_t>((zy - m) - log_s, 0) : NEG_INF;
  *ent = (with_entropy && s > 0) ? max_<acc_t>(log_s - t / s, 0) : 0;
}

// Per-row summaries of a block of the vocabulary: m, s, t as stats_row, and zy the target's scaled
// logit where the target lies in this block ([0, V)), else 0 (ignored rows, or a target elsewhere).
template <typename scalar_t, typename acc_t>
void stats_rows(int64_t begin, int64_t end, const scalar_t* logits, int64_t V, int64_t stride, const int64_t* tgt,
                acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* m, acc_t* s, acc_t* t, acc_t* zy) {
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* row = logits + n * stride;
    stats_row<false>(row, V, inv_t, acc_t(0), with_entropy, m[n], s[n], t[n]);
    const int64_t y = tgt[n];
    zy[n] = (y != ignore_index && y >= 0 && y < V) ? static_cast<acc_t>(row[y]) * inv_t : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
void fwd_rows(int64_t begin, int64_t end, const scalar_t* logits, int64_t V, int64_t stride, const int64_t* tgt,
              acc_t inv_t, int64_t ignore_index, bool with_entropy, acc_t* logp, acc_t* ent, acc_t* lse,
              const acc_t* tau) {
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* row = logits + n * stride;
    if (tau)
      fwd_row<true>(row, V, tgt[n], inv_t, tau[n], ignore_index, with_entropy, logp + n, ent + n, lse + n);
    else
      fwd_row<false>(row, V, tgt[n], inv_t, acc_t(0), ignore_index, with_entropy, logp + n, ent + n, lse + n);
  }
}

template <bool CUT, typename scalar_t, typename acc_t>
void bwd_row(const scalar_t* row, scalar_t* orow, int64_t V, int64_t y, acc_t g1, acc_t g2, acc_t l, acc_t entropy,
             acc_t inv_t, acc_t thr) {
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  const acc_t mu = l - entropy;  // sum_v p_v z_v
  // A target id outside [0, V) lies in another block of the vocabulary (the vocabulary-blocked plan):
  // this block gets the softmax and entropy terms only. (Truncated rows are never split: CUT rows
  // always hold their target.)
  const bool here = y >= 0 && y < V;
  const acc_t zy = here ? scaled<CUT>(row[y], inv_t, thr) : acc_t(0);  // read before `out` may overwrite it
  if (CUT && here && !(zy > LOWEST)) g1 = 0;  // a target outside the kept set: logp = -inf, no log-prob gradient
  const acc_t a = -g1 * inv_t, c = -g2 * inv_t;
  acc_t buf[BLOCK];  // computing into a local block first lets GCC vectorise the exp loop
  for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
    const int64_t len = min_(BLOCK, V - v0);
    const scalar_t* in = row + v0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t zr = scaled<CUT>(in[i], inv_t, thr);
      const acc_t z = zr > LOWEST ? zr : LOWEST;
      // (e * c) * (z - mu), not e * (c * (z - mu)): at a -inf logit z is the lowest finite
      // value, e = 0, and c * (z - mu) may overflow to inf (0 * inf = NaN).
      const acc_t e = vexp(z - l);
      buf[i] = e * a + (e * c) * (z - mu);
    }
    scalar_t* out_block = orow + v0;
    for (int64_t i = 0; i < len; ++i) out_block[i] = static_cast<scalar_t>(buf[i]);
  }
  if (!here) return;
  const acc_t zyc = max_(zy, LOWEST);
  const acc_t py = vexp(zyc - l);
  orow[y] = static_cast<scalar_t>((g1 * (1 - py) - g2 * py * (zyc - mu)) * inv_t);
}

template <typename scalar_t, typename acc_t>
void bwd_rows(int64_t begin, int64_t end, const acc_t* g_logp, const acc_t* g_ent, const scalar_t* logits,
              scalar_t* out, int64_t V, int64_t in_stride, int64_t out_stride, const int64_t* tgt,
              const acc_t* lse, const acc_t* ent, acc_t inv_t, int64_t ignore_index, const acc_t* tau) {
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
    if (tau)
      bwd_row<true>(row, orow, V, y, g1, g2, l, ent[n], inv_t, tau[n]);
    else
      bwd_row<false>(row, orow, V, y, g1, g2, l, ent[n], inv_t, acc_t(0));
  }
}

// ---------------------------------------------------------------------------------------------
// Kept-set thresholds of the sampler's truncation (docs/formulas.md §1.1), one row at a time.
// ---------------------------------------------------------------------------------------------

// A min-heap of k values in h[0..k) (h[0] the smallest): restore it below position i.
template <typename acc_t>
inline void sift_down(acc_t* h, int64_t k, int64_t i) {
  const acc_t x = h[i];
  for (int64_t c = 2 * i + 1; c < k; c = 2 * i + 1) {
    if (c + 1 < k && h[c + 1] < h[c]) ++c;
    if (!(h[c] < x)) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = x;
}

// The k-th largest scaled logit (ties counted): a selection with a min-heap of the k largest seen
// (h: k entries of scratch), skipping every block of 64 whose maximum cannot enter the heap (after
// the first blocks, nearly all of them).
template <typename scalar_t, typename acc_t>
acc_t kth_largest(const scalar_t* row, int64_t V, acc_t inv_t, int64_t k, acc_t* h) {
  constexpr int64_t SKIP = 64;
  int64_t filled = 0;
  for (int64_t v0 = 0; v0 < V; v0 += SKIP) {
    const int64_t v1 = min_(V, v0 + SKIP);
    if (filled == k) {
      acc_t bm = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : bm)
      for (int64_t v = v0; v < v1; ++v) {
        const acc_t x = static_cast<acc_t>(row[v]) * inv_t;
        bm = x > bm ? x : bm;
      }
      if (!(bm > h[0])) continue;
    }
    for (int64_t v = v0; v < v1; ++v) {
      const acc_t x = static_cast<acc_t>(row[v]) * inv_t;
      if (filled < k) {
        h[filled++] = x;
        if (filled == k)
          for (int64_t i = k / 2 - 1; i >= 0; --i) sift_down(h, k, i);
      } else if (x > h[0]) {
        h[0] = x;
        sift_down(h, k, 0);
      }
    }
  }
  return h[0];
}

// The top-p threshold among the tokens with z >= t: the largest value u with mass(z >= u) >= top_p
// of the kept mass (every token tied with the boundary is kept). z and e are scratch of V entries.
//   search (default): a threshold search. Bisect the value range of the candidates (the tokens of
//     nonzero weight), keeping the side that holds u and compacting it, so each pass reads only the
//     remaining candidates; the mass above the kept side is carried along.
//   sort: sort the kept values and accumulate their weights in descending order.
template <typename scalar_t, typename acc_t>
acc_t top_p_threshold(const scalar_t* row, int64_t V, acc_t inv_t, acc_t m, acc_t t, acc_t top_p, bool sort,
                      acc_t* z, acc_t* e) {
  constexpr acc_t INF = std::numeric_limits<acc_t>::infinity();
  acc_t total = 0, cmin = INF;
#pragma omp simd reduction(+ : total) reduction(min : cmin)
  for (int64_t v = 0; v < V; ++v) {
    const acc_t x = static_cast<acc_t>(row[v]) * inv_t;
    const acc_t w = x >= t ? vexp(max_(x, std::numeric_limits<acc_t>::lowest()) - m) : acc_t(0);
    z[v] = x;
    e[v] = w;
    total += w;
    cmin = w > 0 ? min_(cmin, x) : cmin;
  }
  const acc_t target = top_p * total;
  if (sort) {
    int64_t c = 0;
    for (int64_t v = 0; v < V; ++v)
      if (e[v] > 0) z[c++] = z[v];
    std::sort(z, z + c, [](acc_t a, acc_t b) { return a > b; });
    acc_t cum = 0;
    for (int64_t j = 0; j < c; ++j) {
      cum += vexp(z[j] - m);
      if (cum >= target) return z[j];
    }
    return c ? z[c - 1] : -INF;
  }
  acc_t above = 0, cmax = m;
  int64_t c = V;
  while (cmin < cmax) {
    acc_t mid = cmin * acc_t(0.5) + cmax * acc_t(0.5);
    if (!(mid > cmin)) mid = cmax;  // adjacent values: split between them
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < c; ++i) s += z[i] >= mid ? e[i] : acc_t(0);
    const bool up = above + s >= target;  // the threshold is >= mid: keep the upper side
    if (!up) above += s;
    int64_t k = 0;
    acc_t nmin = INF, nmax = -INF;
    for (int64_t i = 0; i < c; ++i) {
      if (e[i] > 0 && (z[i] >= mid) == up) {
        nmin = min_(nmin, z[i]);
        nmax = max_(nmax, z[i]);
        z[k] = z[i];
        e[k++] = e[i];
      }
    }
    c = k;
    cmin = nmin;
    cmax = nmax;
  }
  return cmax;
}

// scratch: 2 * V entries (+ top_k when 0 < top_k < V), owned by the caller.
template <typename scalar_t, typename acc_t>
void cutoff_rows(int64_t begin, int64_t end, const scalar_t* logits, int64_t V, int64_t stride, acc_t inv_t,
                 int64_t top_k, acc_t top_p, acc_t log_min_p, bool min_p_first, bool sort_top_p, acc_t* tau,
                 acc_t* scratch) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* row = logits + n * stride;
    acc_t m = NEG_INF;
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) {
      const acc_t x = static_cast<acc_t>(row[v]) * inv_t;
      m = x > m ? x : m;
    }
    acc_t t = NEG_INF;
    if (m > NEG_INF) {  // an all -inf row keeps "everything": it has no distribution at all
      if (top_k > 0 && top_k < V) t = kth_largest(row, V, inv_t, top_k, scratch + 2 * V);
      // min-p keeps p_v >= min_p * p_max, i.e. z_v >= max z + log(min_p), whatever was removed before
      const acc_t t_min = m + log_min_p;
      if (min_p_first) t = max_(t, t_min);
      if (top_p < 1) t = max_(t, top_p_threshold(row, V, inv_t, m, t, top_p, sort_top_p, scratch, scratch + V));
      t = max_(t, t_min);
    }
    tau[n] = t;
  }
}



// ---------------------------------------------------------------------------------------------
// Divergence between two heads' logits, one row at a time (docs/formulas.md §14): the student's
// and the teacher's rows (V values each, a few hundred KB) stay in cache across the passes, where
// the PyTorch reference makes a dozen passes over whole [rows, V] blocks.
// ---------------------------------------------------------------------------------------------

namespace {
// log(1 + u) for u in [0, 1] (Cephes' logf on the mantissa of 1 + u), vectorisable; fp64: libm.
inline float vlog1p01(float u) {
  float x = 1.0f + u;
  const bool big = x > 1.41421356f;
  x = big ? 0.5f * x : x;
  const float e = big ? 1.0f : 0.0f;
  const float f = x - 1.0f, z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * e;
}
inline double vlog1p01(double u) { return std::log1p(u); }

// max_v x[v] * inv_t (inv_t > 0) and sum_v exp(x[v] * inv_t - max), each over fixed blocks.
template <typename acc_t>
inline acc_t row_lse(const acc_t* x, int64_t V, acc_t inv_t) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  acc_t m = NEG_INF;
  for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
    const int64_t v1 = min_(V, v0 + BLOCK);
    acc_t bm = NEG_INF;
#pragma omp simd reduction(max : bm)
    for (int64_t v = v0; v < v1; ++v) bm = x[v] > bm ? x[v] : bm;
    m = bm > m ? bm : m;
  }
  m *= inv_t;
  if (!(m > NEG_INF) || !(m - m == 0)) return m;  // all -inf (or +inf / NaN): no distribution
  acc_t s = 0;
  for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
    const int64_t v1 = min_(V, v0 + BLOCK);
    acc_t bs = 0;
#pragma omp simd reduction(+ : bs)
    for (int64_t v = v0; v < v1; ++v) bs += vexp(max_(x[v] * inv_t, LOWEST) - m);
    s += bs;
  }
  return m + std::log(s);
}
}  // namespace

// kind: 0 forward_kl KL(q || p), 1 reverse_kl KL(p || q), 2 jsd (teacher weight beta). With g,
// the student's row is overwritten by g * d value / d z_s and the teacher's row is scratch.
// -inf logits are clamped to the lowest finite value (exp gives exactly 0, 0 * finite = 0).
template <typename acc_t>
void divergence_rows(int64_t begin, int64_t end, acc_t* zs, acc_t* zt, int64_t V, int64_t s_stride,
                     int64_t t_stride, const acc_t* g, acc_t inv_t, int64_t kind, acc_t beta, acc_t* value) {
  constexpr acc_t LOWEST = std::numeric_limits<acc_t>::lowest();
  const acc_t log_b = kind == 2 ? std::log(beta) : acc_t(0), log_1b = kind == 2 ? std::log1p(-beta) : acc_t(0);
  for (int64_t n = begin; n < end; ++n) {
    acc_t* s = zs + n * s_stride;
    acc_t* t = zt + n * t_stride;
    const acc_t ls0 = row_lse(s, V, inv_t), lt0 = row_lse(t, V, inv_t);
    const acc_t coef = g ? g[n] * inv_t : acc_t(0);
    if (!(ls0 - ls0 == 0) || !(lt0 - lt0 == 0)) {  // a row with no finite distribution: no divergence
      value[n] = std::numeric_limits<acc_t>::quiet_NaN();
      if (g) for (int64_t v = 0; v < V; ++v) s[v] = acc_t(0);
      continue;
    }
    const bool grad = g != nullptr && coef != 0;
    acc_t a1 = 0, a2 = 0;  // forward/reverse: the KL; jsd: KL(p || m), KL(q || m)
    for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
      const int64_t v1 = min_(V, v0 + BLOCK);
      acc_t b1 = 0, b2 = 0;
      if (kind == 0) {
#pragma omp simd reduction(+ : b1)
        for (int64_t v = v0; v < v1; ++v) {
          const acc_t ls = max_(s[v] * inv_t, LOWEST) - ls0, lt = max_(t[v] * inv_t, LOWEST) - lt0;
          const acc_t p = vexp(ls), q = vexp(lt);
          b1 += q * (lt - ls);
          if (grad) s[v] = coef * (p - q);
        }
      } else if (kind == 1) {
#pragma omp simd reduction(+ : b1)
        for (int64_t v = v0; v < v1; ++v) {
          const acc_t ls = max_(s[v] * inv_t, LOWEST) - ls0, lt = max_(t[v] * inv_t, LOWEST) - lt0;
          const acc_t p = vexp(ls), d = ls - lt;
          b1 += p * d;
          if (grad) {
            s[v] = p;
            t[v] = d;
          }
        }
      } else {
#pragma omp simd reduction(+ : b1, b2)
        for (int64_t v = v0; v < v1; ++v) {
          const acc_t ls = max_(s[v] * inv_t, LOWEST) - ls0, lt = max_(t[v] * inv_t, LOWEST) - lt0;
          const acc_t p = vexp(ls), q = vexp(lt);
          const acc_t x = ls + log_1b, y = lt + log_b;  // log of the mixture's two parts
          const acc_t hi = max_(x, y), lo = min_(x, y);
          const acc_t lm = hi + vlog1p01(vexp(lo - hi));
          const acc_t d = ls - lm;
          b1 += p * d;
          b2 += q * (lt - lm);
          if (grad) {
            s[v] = p;
            t[v] = d;
          }
        }
      }
      a1 += b1;
      a2 += b2;
    }
    value[n] = max_<acc_t>(kind == 2 ? beta * a2 + (1 - beta) * a1 : a1, 0);
    if (g == nullptr) continue;
    if (!grad) {
      for (int64_t v = 0; v < V; ++v) s[v] = acc_t(0);
      continue;
    }
    if (kind == 0) continue;
    // reverse: g p (log p - log q - KL) / T; jsd: g (1 - beta) p (log p - log m - KL(p || m)) / T
    const acc_t c = kind == 2 ? coef * (1 - beta) : coef;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) s[v] = c * s[v] * (t[v] - a1);
  }
}

}  // namespace PYRL_ROWS_ISA
}  // namespace pyrl

// Explicit instantiation of both kernels for one (input, accumulation) dtype pair, used by each
// ISA's translation unit inside its own namespace.
#define PYRL_INSTANTIATE_ROWS(S, A)                                                                              \
  template void fwd_rows<S, A>(int64_t, int64_t, const S*, int64_t, int64_t, const int64_t*, A, int64_t, bool,  \
                               A*, A*, A*, const A*);                                                            \
  template void bwd_rows<S, A>(int64_t, int64_t, const A*, const A*, const S*, S*, int64_t, int64_t, int64_t,   \
                               const int64_t*, const A*, const A*, A, int64_t, const A*);                        \
  template void stats_rows<S, A>(int64_t, int64_t, const S*, int64_t, int64_t, const int64_t*, A, int64_t, bool, \
                                 A*, A*, A*, A*);                                                              \
  template void cutoff_rows<S, A>(int64_t, int64_t, const S*, int64_t, int64_t, A, int64_t, A, A, bool, bool, A*, \
                                  A*);

// The divergence kernel, for the accumulation dtypes only (float, double): the chunk walk's logits.
#define PYRL_INSTANTIATE_DIVERGENCE(A) \
  template void divergence_rows<A>(int64_t, int64_t, A*, A*, int64_t, int64_t, int64_t, const A*, A, int64_t, A, A*);
