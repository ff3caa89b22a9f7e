// BiQGEMM CPU kernel (see biqgemm.h for the ABI and the packed layout).
//
// Per input row and block of 32 activations, eight mu=4 tables of the 16 signed sums
// T[key] = sum_s (bit_s(key) ? +x_s : -x_s) are built once; each 4-bit key of the packed bit-planes
// indexes one table. Exact mode keeps fp32 tables (AVX2: two vpermps + blend per 8 lookups);
// fast mode quantizes each block's tables to int8 with one scale and looks up 32 keys per vpshufb
// (AVX-512 VBMI: 64 per vpermb over four tables). Threads claim chunks of consecutive row tiles
// (threadpool.h), so each streams contiguous runs of the packed weight. z * sum(x) over a group is
// added exactly from per-group sums of x.
#include "biqgemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "threadpool.h"

#if defined(__x86_64__) || defined(_M_X64)
#define QG_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int kRows = QG_TILE_ROWS;   // rows per tile
constexpr int kBlock = QG_BLOCK_K;    // activations per block (8 chunks of mu = 4)
constexpr int kBlockBytes = 128;      // packed bytes per (tile, block, plane) = 32 rows * 8 nibbles
constexpr int kTable = 128;           // table entries per block = 8 chunks * 16
constexpr int kMaxBlocksPerStep = 16; // blocks whose keys stay in L1 while looping over the batch
constexpr int64_t kStepTableBytes = 16 << 10;  // tables of one step (all batch rows), kept in L1
constexpr int64_t kBatchSlab = 64;    // input rows whose tables are built at once
constexpr int64_t kPrivateTableRows = 4;  // up to this batch, each thread builds its own tables

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512vbmi"};

struct Geometry {
  int64_t m, k, gs, mt, g, gp, bpg, nb;
  int q;
};

bool make_geometry(int64_t m, int64_t k, int q, int64_t gs, Geometry* out) {
  if (m < 1 || k < 1 || q < 1 || q > 8 || gs < 1 || gs > k) return false;
  Geometry g;
  g.m = m;
  g.k = k;
  g.q = q;
  g.gs = gs;
  g.mt = (m + kRows - 1) / kRows;
  g.g = (k + gs - 1) / gs;
  g.gp = (gs + kBlock - 1) / kBlock * kBlock;
  g.bpg = g.gp / kBlock;
  g.nb = g.g * g.bpg;
  *out = g;
  return true;
}

// Columns of block b that exist in the original matrix: [k0, k0 + count).
inline void block_span(const Geometry& g, int64_t b, int64_t* k0, int64_t* count) {
  const int64_t grp = b / g.bpg;
  const int64_t j0 = (b % g.bpg) * kBlock;
  *k0 = grp * g.gs + j0;
  int64_t c = std::min<int64_t>(kBlock, g.gs - j0);
  c = std::min<int64_t>(c, g.k - *k0);
  *count = std::max<int64_t>(c, 0);
}

struct Ctx {
  Geometry g;
  const uint8_t* packed;
  const float* alpha;
  const float* offset;
  const float* bias;
  int64_t n;        // rows in this slab
  int64_t blocks_per_step;  // blocks processed for every batch row before moving on
  float* tf;        // exact tables [nb][n][128]
  int8_t* tq;       // fast tables  [nb][n][128]
  float* ts;        // fast scales  [nb][n]
  float* gsum;      // [n][G] sums of x per group (only with offset)
};

// ---------------------------------------------------------------- table construction (portable)
void build_exact_scalar(const float* xs, float* t) {
  for (int c = 0; c < 8; ++c) {
    const float* x = xs + 4 * c;
    float* tc = t + 16 * c;
    tc[0] = -(x[0] + x[1] + x[2] + x[3]);
    for (int s = 0; s < 4; ++s) {  // doubling: T[j + 2^s] = T[j] + 2 x_s
      const int h = 1 << s;
      for (int j = 0; j < h; ++j) tc[j + h] = tc[j] + 2.0f * x[s];
    }
  }
}

float build_fast_scalar(const float* xs, int8_t* tq) {
  float t[kTable];
  build_exact_scalar(xs, t);
  float amax = 0.f;
  for (int c = 0; c < 8; ++c) {
    const float* x = xs + 4 * c;
    amax = std::max(amax, std::fabs(x[0]) + std::fabs(x[1]) + std::fabs(x[2]) + std::fabs(x[3]));
  }
  if (!(amax > 0.f)) {
    std::memset(tq, 0, kTable);
    return 0.f;
  }
  const float inv = 127.f / amax;
  for (int j = 0; j < kTable; ++j) {
    float v = std::nearbyint(t[j] * inv);
    v = std::min(127.f, std::max(-127.f, v));
    tq[j] = static_cast<int8_t>(v);
  }
  return amax / 127.f;
}

// ---------------------------------------------------------------- tile kernels (portable)
void tile_exact_scalar(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const uint8_t* wt = c.packed + t * g.nb * g.q * kBlockBytes;
  const float* at = c.alpha + t * g.g * g.q * kRows;
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t n = 0; n < c.n; ++n) {
    float* yb = ybuf + n * kRows;
    for (int64_t b = 0; b < g.nb; ++b) {
      const float* tab = c.tf + (b * c.n + n) * kTable;
      const int64_t grp = b / g.bpg;
      for (int i = 0; i < g.q; ++i) {
        const uint8_t* kp = wt + (b * g.q + i) * kBlockBytes;
        const float* al = at + (grp * g.q + i) * kRows;
        for (int r = 0; r < kRows; ++r) {
          float s = 0.f;
          for (int p = 0; p < 4; ++p) {
            const uint8_t v = kp[p * kRows + r];
            s += tab[(2 * p) * 16 + (v & 15)] + tab[(2 * p + 1) * 16 + (v >> 4)];
          }
          yb[r] += al[r] * s;
        }
      }
    }
  }
}

void tile_fast_scalar(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const uint8_t* wt = c.packed + t * g.nb * g.q * kBlockBytes;
  const float* at = c.alpha + t * g.g * g.q * kRows;
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t n = 0; n < c.n; ++n) {
    float* yb = ybuf + n * kRows;
    for (int64_t b = 0; b < g.nb; ++b) {
      const int8_t* tab = c.tq + (b * c.n + n) * kTable;
      const float scale = c.ts[b * c.n + n];
      const int64_t grp = b / g.bpg;
      float z[kRows] = {0.f};
      for (int i = 0; i < g.q; ++i) {
        const uint8_t* kp = wt + (b * g.q + i) * kBlockBytes;
        const float* al = at + (grp * g.q + i) * kRows;
        for (int r = 0; r < kRows; ++r) {
          int s = 0;
          for (int p = 0; p < 4; ++p) {
            const uint8_t v = kp[p * kRows + r];
            s += tab[(2 * p) * 16 + (v & 15)] + tab[(2 * p + 1) * 16 + (v >> 4)];
          }
          z[r] += al[r] * static_cast<float>(s);
        }
      }
      for (int r = 0; r < kRows; ++r) yb[r] += z[r] * scale;
    }
  }
}

#ifdef QG_X86
// ---------------------------------------------------------------- AVX2 + FMA
#define QG_AVX2 __attribute__((target("avx2,fma")))

QG_AVX2 void build_exact_avx2(const float* xs, float* t) {
  const __m256 s0 = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
  const __m256 s1 = _mm256_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1);
  const __m256 s2 = _mm256_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1);
  for (int c = 0; c < 8; ++c) {
    const float* x = xs + 4 * c;
    __m256 base = _mm256_mul_ps(_mm256_set1_ps(x[0]), s0);
    base = _mm256_fmadd_ps(_mm256_set1_ps(x[1]), s1, base);
    base = _mm256_fmadd_ps(_mm256_set1_ps(x[2]), s2, base);
    const __m256 x3 = _mm256_set1_ps(x[3]);
    _mm256_store_ps(t + 16 * c, _mm256_sub_ps(base, x3));
    _mm256_store_ps(t + 16 * c + 8, _mm256_add_ps(base, x3));
  }
}

QG_AVX2 float build_fast_avx2(const float* xs, int8_t* tq) {
  alignas(64) float t[kTable];
  build_exact_avx2(xs, t);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps();
  for (int j = 0; j < kTable; j += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_load_ps(t + j)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4);
  if (!(amax > 0.f)) {
    std::memset(tq, 0, kTable);
    return 0.f;
  }
  const __m256 inv = _mm256_set1_ps(127.f / amax);
  for (int c = 0; c < 8; ++c) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(t + 16 * c), inv));
    const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(t + 16 * c + 8), inv));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
    const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tq + 16 * c), b);
  }
  return amax / 127.f;
}

QG_AVX2 void tile_exact_avx2(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const int q = g.q;
  const uint8_t* wt = c.packed + t * g.nb * q * kBlockBytes;
  const float* at = c.alpha + t * g.g * q * kRows;
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t kb0 = 0; kb0 < g.nb; kb0 += c.blocks_per_step) {
    const int64_t kb1 = std::min<int64_t>(g.nb, kb0 + c.blocks_per_step);
    for (int64_t n = 0; n < c.n; ++n) {
      float* yb = ybuf + n * kRows;
      __m256 y0 = _mm256_load_ps(yb), y1 = _mm256_load_ps(yb + 8);
      __m256 y2 = _mm256_load_ps(yb + 16), y3 = _mm256_load_ps(yb + 24);
      for (int64_t b = kb0; b < kb1; ++b) {
        const float* tab = c.tf + (b * c.n + n) * kTable;
        const int64_t grp = b / g.bpg;
        for (int i = 0; i < q; ++i) {
          const uint8_t* kp = wt + (b * q + i) * kBlockBytes;
          const float* al = at + (grp * q + i) * kRows;
          __m256 acc[4];
#pragma GCC unroll 4
          for (int s = 0; s < 4; ++s) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
#pragma GCC unroll 4
            for (int p = 0; p < 4; ++p) {
              const __m256i v = _mm256_cvtepu8_epi32(
                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kp + p * kRows + s * 8)));
              const float* t0 = tab + 32 * p;
              const float* t1 = t0 + 16;
              // vpermps reads index bits 0-2; bit 3 of the nibble, moved to the sign bit, picks the half.
              const __m256 e0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(t0), v),
                                                 _mm256_permutevar8x32_ps(_mm256_load_ps(t0 + 8), v),
                                                 _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
              const __m256i v1 = _mm256_srli_epi32(v, 4);
              const __m256 e1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(t1), v1),
                                                 _mm256_permutevar8x32_ps(_mm256_load_ps(t1 + 8), v1),
                                                 _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
              a0 = _mm256_add_ps(a0, e0);
              a1 = _mm256_add_ps(a1, e1);
            }
            acc[s] = _mm256_add_ps(a0, a1);
          }
          y0 = _mm256_fmadd_ps(_mm256_loadu_ps(al), acc[0], y0);
          y1 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 8), acc[1], y1);
          y2 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 16), acc[2], y2);
          y3 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 24), acc[3], y3);
        }
      }
      _mm256_store_ps(yb, y0);
      _mm256_store_ps(yb + 8, y1);
      _mm256_store_ps(yb + 16, y2);
      _mm256_store_ps(yb + 24, y3);
    }
  }
}

// Sum of the int8 lookups of one (block, plane) for 32 rows, as int16:
// lanes of *a = rows 0-7 | 16-23, lanes of *b = rows 8-15 | 24-31.
QG_AVX2 inline void lookup_block_avx2(const uint8_t* kp, const int8_t* tab, __m256i* a, __m256i* b) {
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi8(1);
  __m256i sa = _mm256_setzero_si256(), sb = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + p * kRows));
    const __m256i lo = _mm256_and_si256(kv, m0f);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(kv, 4), m0f);
    const __m256i t0 = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tab + 32 * p)));
    const __m256i t1 =
        _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tab + 32 * p + 16)));
    const __m256i r0 = _mm256_shuffle_epi8(t0, lo);
    const __m256i r1 = _mm256_shuffle_epi8(t1, hi);
    // Interleave the two chunks of each row, then add the pairs into int16 (|sum| <= 254).
    sa = _mm256_add_epi16(sa, _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r0, r1)));
    sb = _mm256_add_epi16(sb, _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r0, r1)));
  }
  *a = sa;
  *b = sb;
}

QG_AVX2 inline void int16_rows_to_f32(__m256i a, __m256i b, __m256* f) {
  f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));       // rows 0-7
  f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(b)));       // rows 8-15
  f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)));  // rows 16-23
  f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(b, 1)));  // rows 24-31
}

QG_AVX2 void tile_fast_avx2(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const int q = g.q;
  const uint8_t* wt = c.packed + t * g.nb * q * kBlockBytes;
  const float* at = c.alpha + t * g.g * q * kRows;
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t kb0 = 0; kb0 < g.nb; kb0 += c.blocks_per_step) {
    const int64_t kb1 = std::min<int64_t>(g.nb, kb0 + c.blocks_per_step);
    for (int64_t n = 0; n < c.n; ++n) {
      float* yb = ybuf + n * kRows;
      __m256 y0 = _mm256_load_ps(yb), y1 = _mm256_load_ps(yb + 8);
      __m256 y2 = _mm256_load_ps(yb + 16), y3 = _mm256_load_ps(yb + 24);
      for (int64_t b = kb0; b < kb1; ++b) {
        const int8_t* tab = c.tq + (b * c.n + n) * kTable;
        const __m256 scale = _mm256_set1_ps(c.ts[b * c.n + n]);
        const int64_t grp = b / g.bpg;
        __m256 z0 = _mm256_setzero_ps(), z1 = _mm256_setzero_ps();
        __m256 z2 = _mm256_setzero_ps(), z3 = _mm256_setzero_ps();
        for (int i = 0; i < q; ++i) {
          __m256i a, bb;
          lookup_block_avx2(wt + (b * q + i) * kBlockBytes, tab, &a, &bb);
          __m256 f[4];
          int16_rows_to_f32(a, bb, f);
          const float* al = at + (grp * q + i) * kRows;
          z0 = _mm256_fmadd_ps(_mm256_loadu_ps(al), f[0], z0);
          z1 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 8), f[1], z1);
          z2 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 16), f[2], z2);
          z3 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 24), f[3], z3);
        }
        y0 = _mm256_fmadd_ps(z0, scale, y0);
        y1 = _mm256_fmadd_ps(z1, scale, y1);
        y2 = _mm256_fmadd_ps(z2, scale, y2);
        y3 = _mm256_fmadd_ps(z3, scale, y3);
      }
      _mm256_store_ps(yb, y0);
      _mm256_store_ps(yb + 8, y1);
      _mm256_store_ps(yb + 16, y2);
      _mm256_store_ps(yb + 24, y3);
    }
  }
}

// ---------------------------------------------------------------- AVX-512 (F + BW + VBMI)
// Compiled here but NOT run on the development machine (AMD Zen 3 has no AVX-512): untested.
// GCC 12's AVX-512 headers self-initialise "undefined" vectors, which -Wall reports; it is harmless.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define QG_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vbmi")))

QG_AVX512 void tile_exact_avx512(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const int q = g.q;
  const uint8_t* wt = c.packed + t * g.nb * q * kBlockBytes;
  const float* at = c.alpha + t * g.g * q * kRows;
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t kb0 = 0; kb0 < g.nb; kb0 += c.blocks_per_step) {
    const int64_t kb1 = std::min<int64_t>(g.nb, kb0 + c.blocks_per_step);
    for (int64_t n = 0; n < c.n; ++n) {
      float* yb = ybuf + n * kRows;
      __m512 y0 = _mm512_load_ps(yb), y1 = _mm512_load_ps(yb + 16);
      for (int64_t b = kb0; b < kb1; ++b) {
        const float* tab = c.tf + (b * c.n + n) * kTable;
        const int64_t grp = b / g.bpg;
        for (int i = 0; i < q; ++i) {
          const uint8_t* kp = wt + (b * q + i) * kBlockBytes;
          const float* al = at + (grp * q + i) * kRows;
          __m512 acc[2];
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
#pragma GCC unroll 4
            for (int p = 0; p < 4; ++p) {
              const __m512i v = _mm512_cvtepu8_epi32(
                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + p * kRows + h * 16)));
              // vpermps on 16 lanes reads index bits 0-3: the low nibble directly, the high one shifted.
              a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(v, _mm512_load_ps(tab + 32 * p)));
              a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4),
                                                            _mm512_load_ps(tab + 32 * p + 16)));
            }
            acc[h] = _mm512_add_ps(a0, a1);
          }
          y0 = _mm512_fmadd_ps(_mm512_loadu_ps(al), acc[0], y0);
          y1 = _mm512_fmadd_ps(_mm512_loadu_ps(al + 16), acc[1], y1);
        }
      }
      _mm512_store_ps(yb, y0);
      _mm512_store_ps(yb + 16, y1);
    }
  }
}

QG_AVX512 void tile_fast_avx512(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const int q = g.q;
  const uint8_t* wt = c.packed + t * g.nb * q * kBlockBytes;
  const float* at = c.alpha + t * g.g * q * kRows;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i ones = _mm512_set1_epi8(1);
  // Byte offsets that point each 32-byte half of a key vector at its table inside a 64-byte register
  // holding four chunk tables: low nibbles -> tables 0 / 2, high nibbles -> tables 1 / 3.
  const __m512i off_lo = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi8(32), 1);
  const __m512i off_hi = _mm512_inserti64x4(_mm512_set1_epi8(16), _mm256_set1_epi8(48), 1);
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t kb0 = 0; kb0 < g.nb; kb0 += c.blocks_per_step) {
    const int64_t kb1 = std::min<int64_t>(g.nb, kb0 + c.blocks_per_step);
    for (int64_t n = 0; n < c.n; ++n) {
      float* yb = ybuf + n * kRows;
      __m256 y0 = _mm256_load_ps(yb), y1 = _mm256_load_ps(yb + 8);
      __m256 y2 = _mm256_load_ps(yb + 16), y3 = _mm256_load_ps(yb + 24);
      for (int64_t b = kb0; b < kb1; ++b) {
        const int8_t* tab = c.tq + (b * c.n + n) * kTable;
        const __m512i ta = _mm512_load_si512(tab);
        const __m512i tb = _mm512_load_si512(tab + 64);
        const __m256 scale = _mm256_set1_ps(c.ts[b * c.n + n]);
        const int64_t grp = b / g.bpg;
        __m256 z0 = _mm256_setzero_ps(), z1 = _mm256_setzero_ps();
        __m256 z2 = _mm256_setzero_ps(), z3 = _mm256_setzero_ps();
        for (int i = 0; i < q; ++i) {
          const uint8_t* kp = wt + (b * q + i) * kBlockBytes;
          __m512i sa = _mm512_setzero_si512(), sb = _mm512_setzero_si512();
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            const __m512i kv = _mm512_loadu_si512(kp + 64 * h);
            const __m512i lo = _mm512_or_si512(_mm512_and_si512(kv, m0f), off_lo);
            const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(kv, 4), m0f), off_hi);
            const __m512i tt = h ? tb : ta;
            const __m512i r0 = _mm512_permutexvar_epi8(lo, tt);
            const __m512i r1 = _mm512_permutexvar_epi8(hi, tt);
            sa = _mm512_add_epi16(sa, _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(r0, r1)));
            sb = _mm512_add_epi16(sb, _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(r0, r1)));
          }
          // The upper 256 bits hold the same rows for the other two chunks: fold them.
          const __m256i a = _mm256_add_epi16(_mm512_castsi512_si256(sa), _mm512_extracti64x4_epi64(sa, 1));
          const __m256i bb = _mm256_add_epi16(_mm512_castsi512_si256(sb), _mm512_extracti64x4_epi64(sb, 1));
          __m256 f[4];
          f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));
          f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(bb)));
          f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)));
          f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(bb, 1)));
          const float* al = at + (grp * q + i) * kRows;
          z0 = _mm256_fmadd_ps(_mm256_loadu_ps(al), f[0], z0);
          z1 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 8), f[1], z1);
          z2 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 16), f[2], z2);
          z3 = _mm256_fmadd_ps(_mm256_loadu_ps(al + 24), f[3], z3);
        }
        y0 = _mm256_fmadd_ps(z0, scale, y0);
        y1 = _mm256_fmadd_ps(z1, scale, y1);
        y2 = _mm256_fmadd_ps(z2, scale, y2);
        y3 = _mm256_fmadd_ps(z3, scale, y3);
      }
      _mm256_store_ps(yb, y0);
      _mm256_store_ps(yb + 8, y1);
      _mm256_store_ps(yb + 16, y2);
      _mm256_store_ps(yb + 24, y3);
    }
  }
}
#pragma GCC diagnostic pop
#endif  // QG_X86

// ---------------------------------------------------------------- dispatch
bool cpu_supports(int isa) {
  if (isa == ISA_SCALAR) return true;
#ifdef QG_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == ISA_AVX2) return avx2;
  if (isa == ISA_AVX512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi");
#endif
  return false;
}

int isa_from_name(const char* s) {
  if (!s) return -1;
  for (int i = 0; i < 3; ++i)
    if (std::strcmp(s, kIsaNames[i]) == 0) return i;
  if (std::strcmp(s, "avx512") == 0) return ISA_AVX512;
  return -1;
}

// The best supported path, or the one QGRAPH_BIQGEMM_ISA names when this CPU can run it
// (read on every call so a host can switch paths at run time).
int resolve_isa() {
  const char* env = std::getenv("QGRAPH_BIQGEMM_ISA");
  if (env && *env) {
    const int want = isa_from_name(env);
    if (want >= 0 && cpu_supports(want)) return want;
  }
  for (int i = ISA_AVX512; i > ISA_SCALAR; --i)
    if (cpu_supports(i)) return i;
  return ISA_SCALAR;
}

std::atomic<int> g_threads{0};
constexpr int kMaxThreads = 256;

struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) / 4096 * 4096;
      p = std::aligned_alloc(64, cap);
      if (!p) cap = 0;
    }
    return p;
  }
};
thread_local Scratch t_scratch;

inline size_t align64(size_t v) { return (v + 63) / 64 * 64; }

using TileFn = void (*)(const Ctx&, int64_t, float*);
using BuildExactFn = void (*)(const float*, float*);
using BuildFastFn = float (*)(const float*, int8_t*);

struct Builders {
  bool fast;
  BuildExactFn exact;
  BuildFastFn quant;
};

// Tables of items [lo, hi) of the slab, item = block * n + row (block-major: one step's tables for
// every batch row are contiguous, and rows never alias the same L1 sets).
void build_tables(const Ctx& c, const Builders& bld, const float* xs0, int64_t lo, int64_t hi) {
  const Geometry& g = c.g;
  for (int64_t it = lo; it < hi; ++it) {
    const int64_t b = it / c.n, r = it % c.n;
    int64_t k0, cnt;
    block_span(g, b, &k0, &cnt);
    alignas(64) float xs[kBlock];
    for (int j = 0; j < kBlock; ++j) xs[j] = j < cnt ? xs0[r * g.k + k0 + j] : 0.f;
    if (bld.fast)
      c.ts[it] = bld.quant(xs, c.tq + it * kTable);
    else
      bld.exact(xs, c.tf + it * kTable);
  }
}

// Sums of x over groups [lo, hi) of the slab, item = row * G + group (for z * sum(x)).
void group_sums(const Ctx& c, const float* xs0, int64_t lo, int64_t hi) {
  const Geometry& g = c.g;
  for (int64_t it = lo; it < hi; ++it) {
    const int64_t r = it / g.g, grp = it % g.g;
    const int64_t ka = grp * g.gs, kz = std::min(g.k, ka + g.gs);
    double s = 0.0;
    for (int64_t kk = ka; kk < kz; ++kk) s += xs0[r * g.k + kk];
    c.gsum[it] = static_cast<float>(s);
  }
}

// Adds z * sum(x) and the bias to a tile's accumulators and writes its real rows of y.
void finish_tile(const Ctx& c, int64_t t, float* ybuf, float* y0) {
  const Geometry& g = c.g;
  const int64_t rows = std::min<int64_t>(kRows, g.m - t * kRows);
  for (int64_t r = 0; r < c.n; ++r) {
    float* yb = ybuf + r * kRows;
    if (c.offset) {
      const float* zt = c.offset + t * g.g * kRows;
      for (int64_t grp = 0; grp < g.g; ++grp) {
        const float s = c.gsum[r * g.g + grp];
        for (int j = 0; j < kRows; ++j) yb[j] += zt[grp * kRows + j] * s;
      }
    }
    float* yr = y0 + r * g.m + t * kRows;
    if (c.bias) {
      for (int64_t j = 0; j < rows; ++j) yr[j] = yb[j] + c.bias[t * kRows + j];
    } else {
      for (int64_t j = 0; j < rows; ++j) yr[j] = yb[j];
    }
  }
}

int num_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::min<unsigned>(hw ? hw : 1, kMaxThreads));
}

struct PackCtx {
  const Geometry* g;
  const uint8_t* planes;
  uint8_t* out;
};
// Packs row tile t (one pool chunk) from the canonical planes.
void pack_tile(void* ctx, int, int64_t t) {
  const PackCtx& pc = *static_cast<const PackCtx*>(ctx);
  const Geometry& g = *pc.g;
  const int64_t m = g.m, q = g.q, kbytes = (g.k + 7) / 8;
  const uint8_t* planes = pc.planes;
  uint8_t* out = pc.out;
  for (int64_t b = 0; b < g.nb; ++b) {
    int64_t k0, cnt;
    block_span(g, b, &k0, &cnt);
    for (int i = 0; i < q; ++i) {
      uint8_t* o = out + ((t * g.nb + b) * q + i) * kBlockBytes;
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = t * kRows + r;
        uint64_t w = 0;
        if (row < m && cnt > 0) {
          // The cnt bits starting at bit k0 of this row, read byte by byte (never past the row).
          const uint8_t* src = planes + (static_cast<int64_t>(i) * m + row) * kbytes;
          const int64_t first = k0 >> 3, last = (k0 + cnt - 1) >> 3;
          for (int64_t j = first; j <= last; ++j) w |= static_cast<uint64_t>(src[j]) << (8 * (j - first));
          w >>= (k0 & 7);
          w &= (cnt == 64 ? ~0ull : ((1ull << cnt) - 1));
        }
        for (int p = 0; p < 4; ++p) o[p * kRows + r] = static_cast<uint8_t>(w >> (8 * p));
      }
    }
  }
}

constexpr int64_t kBuildChunk = 64;  // table blocks / group sums per chunk of the shared build

// Everything one call's chunks need; slot s of the pool owns prep region s (private tables) and ybuf s.
struct CallCtx {
  Ctx c;  // geometry, weights, n; table pointers are set per slot
  Builders bld;
  TileFn tile;
  const float* xs0;
  float* y0;
  char* prep;
  size_t prep_bytes, table_bytes, scale_bytes;
  bool private_tables;
  bool* prepared;  // [slot]: private tables built
  char* ybufs;
  size_t ybuf_bytes;
  int64_t tiles_per_chunk;
  int64_t build_items;

  Ctx for_slot(int slot) const {
    Ctx s = c;
    char* p = prep + prep_bytes * (private_tables ? slot : 0);
    s.tf = bld.fast ? nullptr : reinterpret_cast<float*>(p);
    s.tq = bld.fast ? reinterpret_cast<int8_t*>(p) : nullptr;
    s.ts = bld.fast ? reinterpret_cast<float*>(p + table_bytes) : nullptr;
    s.gsum = c.offset ? reinterpret_cast<float*>(p + table_bytes + scale_bytes) : nullptr;
    return s;
  }
};

void build_chunk(void* ctx, int, int64_t chunk) {
  const CallCtx& cc = *static_cast<const CallCtx*>(ctx);
  const Ctx c = cc.for_slot(0);
  const int64_t ntab = c.n * c.g.nb;
  const int64_t lo = chunk * kBuildChunk, hi = std::min(cc.build_items, lo + kBuildChunk);
  if (lo < ntab) build_tables(c, cc.bld, cc.xs0, lo, std::min(hi, ntab));
  if (hi > ntab) group_sums(c, cc.xs0, std::max(lo, ntab) - ntab, hi - ntab);
}

void tile_chunk(void* ctx, int slot, int64_t chunk) {
  CallCtx& cc = *static_cast<CallCtx*>(ctx);
  const Ctx c = cc.for_slot(slot);
  if (cc.private_tables && !cc.prepared[slot]) {
    build_tables(c, cc.bld, cc.xs0, 0, c.n * c.g.nb);
    if (c.offset) group_sums(c, cc.xs0, 0, c.n * c.g.g);
    cc.prepared[slot] = true;
  }
  float* ybuf = reinterpret_cast<float*>(cc.ybufs + cc.ybuf_bytes * slot);
  const int64_t t0 = chunk * cc.tiles_per_chunk, t1 = std::min(c.g.mt, t0 + cc.tiles_per_chunk);
  for (int64_t t = t0; t < t1; ++t) {
    cc.tile(c, t, ybuf);
    finish_tile(c, t, ybuf, cc.y0);
  }
}

}  // namespace

extern "C" {

QG_API int qg_biqgemm_abi_version(void) { return QG_BIQGEMM_ABI; }

QG_API const char* qg_biqgemm_isa(void) { return kIsaNames[resolve_isa()]; }

QG_API int qg_biqgemm_isa_supported(const char* name) {
  const int i = isa_from_name(name);
  return i >= 0 && cpu_supports(i) ? 1 : 0;
}

QG_API void qg_biqgemm_set_num_threads(int n) { g_threads = n > 0 ? std::min(n, kMaxThreads) : 0; }

QG_API int64_t qg_biqgemm_packed_bytes(int64_t m, int64_t k, int q, int64_t group_size) {
  Geometry g;
  if (!make_geometry(m, k, q, group_size, &g)) return 0;
  return g.mt * g.nb * q * kBlockBytes;
}

QG_API int64_t qg_biqgemm_alpha_floats(int64_t m, int64_t k, int q, int64_t group_size) {
  Geometry g;
  if (!make_geometry(m, k, q, group_size, &g)) return 0;
  return g.mt * g.g * q * kRows;
}

QG_API int64_t qg_biqgemm_offset_floats(int64_t m, int64_t k, int64_t group_size) {
  Geometry g;
  if (!make_geometry(m, k, 1, group_size, &g)) return 0;
  return g.mt * g.g * kRows;
}

QG_API int qg_biqgemm_pack(const uint8_t* planes, int64_t m, int64_t k, int q, int64_t group_size,
                           uint8_t* out) {
  Geometry g;
  if (!planes || !out || !make_geometry(m, k, q, group_size, &g)) return QG_EINVAL;
  PackCtx pc{&g, planes, out};
  qg::ThreadPool::instance().run(num_threads(), g.mt, pack_tile, &pc);
  return QG_OK;
}


QG_API int qg_biqgemm_pack_alpha(const float* alpha, int64_t m, int64_t k, int q, int64_t group_size,
                                 float* out) {
  Geometry g;
  if (!alpha || !out || !make_geometry(m, k, q, group_size, &g)) return QG_EINVAL;
  for (int64_t t = 0; t < g.mt; ++t)
    for (int64_t grp = 0; grp < g.g; ++grp)
      for (int i = 0; i < q; ++i)
        for (int r = 0; r < kRows; ++r) {
          const int64_t row = t * kRows + r;
          out[((t * g.g + grp) * q + i) * kRows + r] = row < m ? alpha[(i * m + row) * g.g + grp] : 0.f;
        }
  return QG_OK;
}

QG_API int qg_biqgemm_pack_offset(const float* offset, int64_t m, int64_t k, int64_t group_size, float* out) {
  Geometry g;
  if (!offset || !out || !make_geometry(m, k, 1, group_size, &g)) return QG_EINVAL;
  for (int64_t t = 0; t < g.mt; ++t)
    for (int64_t grp = 0; grp < g.g; ++grp)
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = t * kRows + r;
        out[(t * g.g + grp) * kRows + r] = row < m ? offset[row * g.g + grp] : 0.f;
      }
  return QG_OK;
}

QG_API int qg_biqgemm_f32(const float* x, int64_t n, int64_t k, const void* packed, const float* alpha,
                          const float* offset, const float* bias, int64_t m, int q, int64_t group_size,
                          int mode, float* y) {
  Geometry g;
  if (!x || !packed || !alpha || !y || n < 0 || !make_geometry(m, k, q, group_size, &g)) return QG_EINVAL;
  if (mode != QG_MODE_EXACT && mode != QG_MODE_FAST) return QG_EINVAL;
  if (n == 0) return QG_OK;

  const int isa = resolve_isa();
  const bool fast = mode == QG_MODE_FAST;
  TileFn tile = fast ? tile_fast_scalar : tile_exact_scalar;
  BuildExactFn build_exact = build_exact_scalar;
  BuildFastFn build_fast = build_fast_scalar;
#ifdef QG_X86
  if (isa >= ISA_AVX2) {
    build_exact = build_exact_avx2;
    build_fast = build_fast_avx2;
    tile = fast ? tile_fast_avx2 : tile_exact_avx2;
  }
  if (isa == ISA_AVX512) tile = fast ? tile_fast_avx512 : tile_exact_avx512;
#endif

  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), g.mt));
  const int64_t slab = std::min(n, kBatchSlab);
  // Small batches: every thread builds its own tables on its first chunk (microseconds), so no thread
  // waits for another; larger batches share one set of tables built in parallel first.
  const bool private_tables = slab <= kPrivateTableRows;
  const size_t table_bytes = align64(slab * g.nb * kTable * (fast ? 1 : sizeof(float)));
  const size_t scale_bytes = fast ? align64(slab * g.nb * sizeof(float)) : 0;
  const size_t gsum_bytes = offset ? align64(slab * g.g * sizeof(float)) : 0;
  const size_t prep_bytes = table_bytes + scale_bytes + gsum_bytes;
  const size_t ybuf_bytes = align64(slab * kRows * sizeof(float));
  const int nprep = private_tables ? nt : 1;
  char* base = static_cast<char*>(t_scratch.get(prep_bytes * nprep + ybuf_bytes * nt + nt));
  if (!base) return QG_ENOMEM;

  CallCtx cc;
  cc.bld = Builders{fast, build_exact, build_fast};
  cc.tile = tile;
  cc.prep = base;
  cc.prep_bytes = prep_bytes;
  cc.table_bytes = table_bytes;
  cc.scale_bytes = scale_bytes;
  cc.private_tables = private_tables;
  cc.ybufs = base + prep_bytes * nprep;
  cc.ybuf_bytes = ybuf_bytes;
  cc.prepared = reinterpret_cast<bool*>(cc.ybufs + ybuf_bytes * nt);
  cc.tiles_per_chunk = std::max<int64_t>(1, std::min<int64_t>(4, g.mt / (8 * nt)));
  cc.c.g = g;
  cc.c.packed = static_cast<const uint8_t*>(packed);
  cc.c.alpha = alpha;
  cc.c.offset = offset;
  cc.c.bias = bias;
  qg::ThreadPool& pool = qg::ThreadPool::instance();

  for (int64_t n0 = 0; n0 < n; n0 += slab) {
    cc.c.n = std::min(slab, n - n0);
    const int64_t step_bytes = cc.c.n * kTable * (fast ? 1 : sizeof(float));
    cc.c.blocks_per_step = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocksPerStep, kStepTableBytes / step_bytes));
    cc.xs0 = x + n0 * k;
    cc.y0 = y + n0 * m;
    std::fill(cc.prepared, cc.prepared + nt, false);
    if (!private_tables) {
      cc.build_items = cc.c.n * g.nb + (offset ? cc.c.n * g.g : 0);
      pool.run(nt, (cc.build_items + kBuildChunk - 1) / kBuildChunk, build_chunk, &cc);
    }
    pool.run(nt, (g.mt + cc.tiles_per_chunk - 1) / cc.tiles_per_chunk, tile_chunk, &cc);
  }
  return QG_OK;
}

}  // extern "C"

// Join the pool's workers when the library is unloaded (dlclose), so none runs unmapped code.
__attribute__((destructor)) static void qg_biqgemm_unload() { qg::ThreadPool::instance().shutdown(); }

// A valid (empty) Python extension module, so setuptools can build this file as one. Weak reference:
// hosts without libpython (e.g. onnxruntime) can still dlopen the library with RTLD_NOW.
#include <Python.h>
#pragma weak PyModule_Create2
static struct PyModuleDef qg_module = {PyModuleDef_HEAD_INIT, "_biqgemm_cpu", nullptr, -1, nullptr,
                                       nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__biqgemm_cpu(void) { return PyModule_Create(&qg_module); }
