// Vector helpers and the one-query attention loop shared by the torch shim's `qgraph::decode_attention` op and the
// native decode step (decode_step.cpp). Internal linkage: each translation unit that includes it gets its own copy.
#ifndef QG_DECODE_MATH_H
#define QG_DECODE_MATH_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

typedef float v16f __attribute__((vector_size(64)));  // lowered to the widest vectors each clone has
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

inline __attribute__((always_inline)) float hsum16(v16f x) {  // a tree, not 16 dependent adds
  const v8f a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline v16f load16(const float* p) {
  v16f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline __attribute__((always_inline)) float dot_f32(const float* a, const float* b, int64_t n) {
  v16f acc = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  return s + hsum16(acc);
}

inline __attribute__((always_inline)) void axpy_f32(float w, const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16f r = load16(y + i) + w * load16(x + i);
    std::memcpy(y + i, &r, sizeof(r));
  }
  for (; i < n; ++i) y[i] += w * x[i];
}

typedef int v16i __attribute__((vector_size(64)));

// exp of 16 floats: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2 and e^r by its Taylor polynomial to r^7
// (relative error ~2e-7, about std::exp's rounding); inputs below -87 give ~1e-38, above 88 are clamped.
inline __attribute__((always_inline)) v16f exp16(v16f x) {
  const v16f lo = v16f{} - 87.f, hi = v16f{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v16f n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (|n| < 2^22)
  const v16f r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  v16f p = v16f{} + (1.f / 5040.f);
  p = p * r + (1.f / 720.f);
  p = p * r + (1.f / 120.f);
  p = p * r + (1.f / 24.f);
  p = p * r + (1.f / 6.f);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// y[i] = x[i] * sigmoid(x[i]) * u[i] (SiLU-gated MLP), vectorized
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
void silu_mul(const float* x, const float* u, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16f a = load16(x + i);
    const v16f r = a / (1.f + exp16(-a)) * load16(u + i);
    std::memcpy(y + i, &r, sizeof(r));
  }
  for (; i < n; ++i) y[i] = x[i] / (1.f + std::exp(-x[i])) * u[i];
}

// Unnormalized softmax(q kᵀ sc) v of the rep query heads of one key/value head over S positions: og (zeros on
// entry) gets sum_s e^(score_s - mx) v_s, mx the largest score and total the sum of e^(score_s - mx) per head
// (mx = -inf, total = 0 and og untouched when every position is masked). score has room for rep rows of S rounded
// up to 16.
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
void attend_partial(const float* qg, const float* kg, const float* vg, float* og, const bool* mb, int64_t S,
                    int64_t D, int64_t rep, float sc, float* score, float* mx, float* total) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t S16 = (S + 15) / 16 * 16;
  std::fill(mx, mx + rep, kNegInf);
  std::fill(total, total + rep, 0.f);
  for (int64_t s = 0; s < S16; ++s) {
    const bool live = s < S && (!mb || mb[s]);
    for (int64_t r = 0; r < rep; ++r) {
      const float x = live ? dot_f32(qg + r * D, kg + s * D, D) * sc : kNegInf;
      score[r * S16 + s] = x;
      mx[r] = std::max(mx[r], x);
    }
  }
  if (mx[0] == kNegInf) return;
  for (int64_t r = 0; r < rep; ++r) {  // probabilities in place; masked positions exactly 0
    float* sr = score + r * S16;
    v16f acc = {0};
    for (int64_t s = 0; s < S16; s += 16) {
      const v16f x = load16(sr + s);
      const v16f p = x == kNegInf ? v16f{} : exp16(x - mx[r]);
      std::memcpy(sr + s, &p, sizeof(p));
      acc += p;
    }
    total[r] = hsum16(acc);
  }
  for (int64_t s = 0; s < S; ++s) {
    if (mb && !mb[s]) continue;
    for (int64_t r = 0; r < rep; ++r) axpy_f32(score[r * S16 + s], vg + s * D, og + r * D, D);
  }
}

// softmax(q kᵀ sc) v for the rep query heads of one key/value head; og holds zeros on entry (and keeps them when
// every position is masked).
inline void attend_group(const float* qg, const float* kg, const float* vg, float* og, const bool* mb, int64_t S,
                         int64_t D, int64_t rep, float sc, float* score, float* mx, float* total) {
  attend_partial(qg, kg, vg, og, mb, S, D, rep, sc, score, mx, total);
  if (mx[0] == -std::numeric_limits<float>::infinity()) return;
  for (int64_t r = 0; r < rep; ++r) {
    const float inv = 1.f / total[r];
    for (int64_t d = 0; d < D; ++d) og[r * D + d] *= inv;
  }
}

}  // namespace

#endif
