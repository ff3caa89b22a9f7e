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
#include <vector>

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
// Software prefetch distance of the LUT tile loops, 8 (block, plane) steps ahead: on SmolLM2's decode step it
// measured 0.2-0.4 ms faster of ~4.5 ms than without (the hardware prefetcher alone ramps up late on short tiles).
constexpr int kPrefetchBytes = 1024;
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
  const uint8_t* kscales;  // block-scale layout (QG_MODE_KSCALES): alpha is NULL, offsets come from here
  bool z_in_tile;          // the tile kernel adds z * sum(x) itself (block-scale AVX-512 kernels)
  const float* offset;
  const float* bias;
  int64_t n;        // rows in this slab
  int64_t blocks_per_step;  // blocks processed for every batch row before moving on
  float* tf;        // exact tables [nb][n][128]
  int8_t* tq;       // fast tables  [nb][n][128]
  float* ts;        // fast scales  [nb][n]
  float* gsum;      // [n][G] sums of x per group (only with offset)
};


// ---------------------------------------------------------------- block scales (layout "cpu-lut4k")
// Per row tile: fp16 D[32], fp16 M[32], then per group 48 bytes: [32] (sc & 15) | (mc & 15) << 4 for row r,
// [16] byte j: row j's (sc >> 4) | (mc >> 4) << 2 in its low nibble, row j + 16's in its high nibble.
// d = D * sc, m = M * mc (fp32); alpha_i = d * 2^(i-1), offset z = d * (2^q - 1) / 2 - m (see block_scaled.py).
constexpr int64_t kKHead = 128, kKGroup = 48;

inline int64_t kscale_tile_bytes(const Geometry& g) { return kKHead + kKGroup * g.g; }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (e == 0) {
    const float f = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (e == 31 ? 0x7f800000u | (mant << 13) : ((e + 112) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 alpha [q][32] and z [32] of one (tile, group) from its 48 code bytes; inlined into each ISA's tile code.
__attribute__((always_inline)) inline void expand_kscales(const uint8_t* gb, int q, const float* dsup,
                                                          const float* msup, float* alpha, float* z) {
  alignas(64) float d[kRows], mn[kRows];
  const uint8_t* hb = gb + kRows;
  for (int r = 0; r < kRows; ++r) {
    const int h = (hb[r & 15] >> (4 * (r >> 4))) & 15;
    d[r] = dsup[r] * static_cast<float>((gb[r] & 15) | ((h & 3) << 4));
    mn[r] = msup[r] * static_cast<float>((gb[r] >> 4) | ((h >> 2) << 4));
  }
  const float hq = static_cast<float>((1 << q) - 1) * 0.5f;
  for (int r = 0; r < kRows; ++r) z[r] = d[r] * hq - mn[r];
  for (int i = 0; i < q; ++i) {
    const float p = 0.5f * static_cast<float>(1 << i);
    for (int r = 0; r < kRows; ++r) alpha[i * kRows + r] = d[r] * p;
  }
}

// The alpha of each group of one row tile: a pointer into the fp32 layout, or expanded from block-scale codes.
struct TileAlpha {
  const float* at = nullptr;
  const uint8_t* kt = nullptr;
  int q;
  int64_t cur = -1;
  alignas(64) float dsup[kRows], msup[kRows], buf[8 * kRows], z[kRows];

  __attribute__((always_inline)) TileAlpha(const Ctx& c, int64_t t) : q(c.g.q) {
    if (c.kscales) {
      kt = c.kscales + t * kscale_tile_bytes(c.g);
      const uint16_t* h = reinterpret_cast<const uint16_t*>(kt);
      for (int r = 0; r < kRows; ++r) dsup[r] = half_to_float(h[r]), msup[r] = half_to_float(h[kRows + r]);
    } else {
      at = c.alpha + t * c.g.g * q * kRows;
    }
  }
  __attribute__((always_inline)) const float* get(int64_t grp) {
    if (!kt) return at + grp * q * kRows;
    if (grp != cur) {
      expand_kscales(kt + kKHead + grp * kKGroup, q, dsup, msup, buf, z);
      cur = grp;
    }
    return buf;
  }
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
  TileAlpha at(c, t);
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t n = 0; n < c.n; ++n) {
    float* yb = ybuf + n * kRows;
    for (int64_t b = 0; b < g.nb; ++b) {
      const float* tab = c.tf + (b * c.n + n) * kTable;
      const int64_t grp = b / g.bpg;
      for (int i = 0; i < g.q; ++i) {
        const uint8_t* kp = wt + (b * g.q + i) * kBlockBytes;
        const float* al = at.get(grp) + i * kRows;
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
  TileAlpha at(c, t);
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
        const float* al = at.get(grp) + i * kRows;
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
  TileAlpha at(c, t);
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
          const float* al = at.get(grp) + i * kRows;
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
  TileAlpha at(c, t);
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
          const float* al = at.get(grp) + i * kRows;
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

// 32 rows x 32 columns of one (block, plane): the eight chunk lookups summed, rows 0-15 / 16-31.
QG_AVX512 inline void lookup_exact_avx512(const uint8_t* kp, const float* tab, __m512* acc) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + p * kRows + h * 16)));
      // vpermps on 16 lanes reads index bits 0-3: the low nibble directly, the high one shifted.
      a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(v, _mm512_load_ps(tab + 32 * p)));
      a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), _mm512_load_ps(tab + 32 * p + 16)));
    }
    acc[h] = _mm512_add_ps(a0, a1);
  }
}

// The same in int8 tables (ta: chunks 0-3, tb: chunks 4-7): int16 sums of 16 rows each, in the order
// a = rows 0-7 | 16-23, bb = rows 8-15 | 24-31.
QG_AVX512 inline void lookup_fast_avx512(const uint8_t* kp, __m512i ta, __m512i tb, __m256i* a, __m256i* bb) {
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i ones = _mm512_set1_epi8(1);
  // Byte offsets that point each 32-byte half of a key vector at its table inside a 64-byte register
  // holding four chunk tables: low nibbles -> tables 0 / 2, high nibbles -> tables 1 / 3.
  const __m512i off_lo = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi8(32), 1);
  const __m512i off_hi = _mm512_inserti64x4(_mm512_set1_epi8(16), _mm256_set1_epi8(48), 1);
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
  *a = _mm256_add_epi16(_mm512_castsi512_si256(sa), _mm512_extracti64x4_epi64(sa, 1));
  *bb = _mm256_add_epi16(_mm512_castsi512_si256(sb), _mm512_extracti64x4_epi64(sb, 1));
}

QG_AVX512 void tile_exact_avx512(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const int q = g.q;
  const uint8_t* wt = c.packed + t * g.nb * q * kBlockBytes;
  TileAlpha at(c, t);
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
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes + 64), _MM_HINT_T0);
          const float* al = at.get(grp) + i * kRows;
          __m512 acc[2];
          lookup_exact_avx512(kp, tab, acc);
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
  TileAlpha at(c, t);
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
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes + 64), _MM_HINT_T0);
          __m256i a, bb;
          lookup_fast_avx512(kp, ta, tb, &a, &bb);
          __m256 f[4];
          f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));
          f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(bb)));
          f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)));
          f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(bb, 1)));
          const float* al = at.get(grp) + i * kRows;
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

// ---- block-scale layout (cpu-lut4k), AVX-512: d and z of 32 rows are decoded in registers once per group and the
// planes of a block are combined with their constant weights 2^(i-1), so no alpha is read or expanded.
QG_AVX512 inline void kscale_dz_avx512(const uint8_t* gb, __m512 ds0, __m512 ds1, __m512 ms0, __m512 ms1, __m512 hq,
                                      __m512* d0, __m512* d1, __m512* z0, __m512* z1) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb));
  const __m512i h8 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gb + kRows)));
  const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3);
  const __m512i h[2] = {_mm512_and_si512(h8, m15), _mm512_srli_epi32(h8, 4)};
  const __m512i l[2] = {_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)),
                        _mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1))};
  const __m512 ds[2] = {ds0, ds1}, ms[2] = {ms0, ms1};
  __m512 d[2], mn[2];
  for (int j = 0; j < 2; ++j) {
    const __m512i sc = _mm512_or_si512(_mm512_and_si512(l[j], m15), _mm512_slli_epi32(_mm512_and_si512(h[j], m3), 4));
    const __m512i mc = _mm512_or_si512(_mm512_srli_epi32(l[j], 4), _mm512_slli_epi32(_mm512_srli_epi32(h[j], 2), 4));
    d[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), ds[j]);
    mn[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(mc), ms[j]);
  }
  *d0 = d[0], *d1 = d[1];
  *z0 = _mm512_sub_ps(_mm512_mul_ps(d[0], hq), mn[0]);
  *z1 = _mm512_sub_ps(_mm512_mul_ps(d[1], hq), mn[1]);
}

struct KTileAvx512 {
  __m512 ds0, ds1, ms0, ms1, hq;
};

QG_AVX512 inline KTileAvx512 ktile_avx512(const Ctx& c, int64_t t) {
  const uint8_t* kt = c.kscales + t * kscale_tile_bytes(c.g);
  KTileAvx512 k;
  k.ds0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kt)));
  k.ds1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kt + 32)));
  k.ms0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kt + 64)));
  k.ms1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kt + 96)));
  k.hq = _mm512_set1_ps(static_cast<float>((1 << c.g.q) - 1) * 0.5f);
  return k;
}

// Adds z * sum(x) itself (finish_tile skips it for these kernels).
QG_AVX512 void tile_exact_k_avx512(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const int q = g.q;
  const uint8_t* wt = c.packed + t * g.nb * q * kBlockBytes;
  const uint8_t* kg = c.kscales + t * kscale_tile_bytes(g) + kKHead;
  const KTileAvx512 kt = ktile_avx512(c, t);
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  for (int64_t kb0 = 0; kb0 < g.nb; kb0 += c.blocks_per_step) {
    const int64_t kb1 = std::min<int64_t>(g.nb, kb0 + c.blocks_per_step);
    for (int64_t n = 0; n < c.n; ++n) {
      float* yb = ybuf + n * kRows;
      __m512 y0 = _mm512_load_ps(yb), y1 = _mm512_load_ps(yb + 16);
      __m512 d0 = _mm512_setzero_ps(), d1 = d0, z0 = d0, z1 = d0;
      int64_t cur = -1;
      for (int64_t b = kb0; b < kb1; ++b) {
        const int64_t grp = b / g.bpg;
        if (grp != cur) {
          kscale_dz_avx512(kg + grp * kKGroup, kt.ds0, kt.ds1, kt.ms0, kt.ms1, kt.hq, &d0, &d1, &z0, &z1);
          cur = grp;
        }
        if (b % g.bpg == 0) {
          const __m512 gs = _mm512_set1_ps(c.gsum[n * g.g + grp]);
          y0 = _mm512_fmadd_ps(z0, gs, y0);
          y1 = _mm512_fmadd_ps(z1, gs, y1);
        }
        const float* tab = c.tf + (b * c.n + n) * kTable;
        __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
        for (int i = 0; i < q; ++i) {
          const uint8_t* kp = wt + (b * q + i) * kBlockBytes;
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes + 64), _MM_HINT_T0);
          __m512 acc[2];
          lookup_exact_avx512(kp, tab, acc);
          const __m512 pw = _mm512_set1_ps(0.5f * static_cast<float>(1 << i));
          c0 = _mm512_fmadd_ps(pw, acc[0], c0);
          c1 = _mm512_fmadd_ps(pw, acc[1], c1);
        }
        y0 = _mm512_fmadd_ps(d0, c0, y0);
        y1 = _mm512_fmadd_ps(d1, c1, y1);
      }
      _mm512_store_ps(yb, y0);
      _mm512_store_ps(yb + 16, y1);
    }
  }
}

// fp32 alpha [G][q][32] and offset [G][32] of row tile t (the GEMM path's per-call expansion).
QG_AVX512 void expand_tile_kscales_avx512(const Ctx& c, int64_t t, float* alpha, float* offset) {
  const Geometry& g = c.g;
  const uint8_t* kg = c.kscales + t * kscale_tile_bytes(g) + kKHead;
  const KTileAvx512 kt = ktile_avx512(c, t);
  for (int64_t grp = 0; grp < g.g; ++grp) {
    __m512 d0, d1, z0, z1;
    kscale_dz_avx512(kg + grp * kKGroup, kt.ds0, kt.ds1, kt.ms0, kt.ms1, kt.hq, &d0, &d1, &z0, &z1);
    float* a = alpha + grp * g.q * kRows;
    for (int i = 0; i < g.q; ++i) {
      const __m512 pw = _mm512_set1_ps(0.5f * static_cast<float>(1 << i));
      _mm512_storeu_ps(a + i * kRows, _mm512_mul_ps(d0, pw));
      _mm512_storeu_ps(a + i * kRows + 16, _mm512_mul_ps(d1, pw));
    }
    _mm512_storeu_ps(offset + grp * kRows, z0);
    _mm512_storeu_ps(offset + grp * kRows + 16, z1);
  }
}

// Fast mode, q <= 4: the planes' int16 sums are combined as sum_i 2^i s_i (|.| <= 15 * 8 * 127, no overflow).
QG_AVX512 void tile_fast_k_avx512(const Ctx& c, int64_t t, float* ybuf) {
  const Geometry& g = c.g;
  const int q = g.q;
  const uint8_t* wt = c.packed + t * g.nb * q * kBlockBytes;
  const uint8_t* kg = c.kscales + t * kscale_tile_bytes(g) + kKHead;
  const KTileAvx512 kt = ktile_avx512(c, t);
  std::memset(ybuf, 0, sizeof(float) * c.n * kRows);
  alignas(64) float dh[kRows], zz[kRows];
  for (int64_t kb0 = 0; kb0 < g.nb; kb0 += c.blocks_per_step) {
    const int64_t kb1 = std::min<int64_t>(g.nb, kb0 + c.blocks_per_step);
    for (int64_t n = 0; n < c.n; ++n) {
      float* yb = ybuf + n * kRows;
      __m256 y[4] = {_mm256_load_ps(yb), _mm256_load_ps(yb + 8), _mm256_load_ps(yb + 16), _mm256_load_ps(yb + 24)};
      int64_t cur = -1;
      for (int64_t b = kb0; b < kb1; ++b) {
        const int64_t grp = b / g.bpg;
        if (grp != cur) {
          __m512 d0, d1, z0, z1;
          kscale_dz_avx512(kg + grp * kKGroup, kt.ds0, kt.ds1, kt.ms0, kt.ms1, kt.hq, &d0, &d1, &z0, &z1);
          const __m512 half = _mm512_set1_ps(0.5f);
          _mm512_store_ps(dh, _mm512_mul_ps(d0, half));
          _mm512_store_ps(dh + 16, _mm512_mul_ps(d1, half));
          _mm512_store_ps(zz, z0);
          _mm512_store_ps(zz + 16, z1);
          cur = grp;
        }
        if (b % g.bpg == 0) {
          const __m256 gs = _mm256_set1_ps(c.gsum[n * g.g + grp]);
          for (int j = 0; j < 4; ++j) y[j] = _mm256_fmadd_ps(_mm256_load_ps(zz + 8 * j), gs, y[j]);
        }
        const int8_t* tab = c.tq + (b * c.n + n) * kTable;
        const __m512i ta = _mm512_load_si512(tab);
        const __m512i tb = _mm512_load_si512(tab + 64);
        __m256i A = _mm256_setzero_si256(), B = _mm256_setzero_si256();
        for (int i = 0; i < q; ++i) {
          const uint8_t* kp = wt + (b * q + i) * kBlockBytes;
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(kp + kPrefetchBytes + 64), _MM_HINT_T0);
          __m256i a, bb;
          lookup_fast_avx512(kp, ta, tb, &a, &bb);
          A = _mm256_add_epi16(A, _mm256_sll_epi16(a, _mm_cvtsi32_si128(i)));
          B = _mm256_add_epi16(B, _mm256_sll_epi16(bb, _mm_cvtsi32_si128(i)));
        }
        const __m256 ts = _mm256_set1_ps(c.ts[b * c.n + n]);
        __m256 f[4];
        f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(A)));
        f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(B)));
        f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(A, 1)));
        f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(B, 1)));
        for (int j = 0; j < 4; ++j)
          y[j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_load_ps(dh + 8 * j), ts), f[j], y[j]);
      }
      for (int j = 0; j < 4; ++j) _mm256_store_ps(yb + 8 * j, y[j]);
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
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
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
// Input rows up to which the LUT path runs, per mode (above: decode + GEMM); set by the host from the target's
// measured crossover (qgraph.kernels.cpu); these defaults match qgraph.target's for a target without one.
std::atomic<int64_t> g_lut_max_rows[2] = {{QG_DEFAULT_LUT_MAX_ROWS_EXACT}, {QG_DEFAULT_LUT_MAX_ROWS_FAST}};
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
    } else if (c.kscales && !c.z_in_tile) {
      TileAlpha ta(c, t);
      for (int64_t grp = 0; grp < g.g; ++grp) {
        ta.get(grp);
        const float s = c.gsum[r * g.g + grp];
        for (int j = 0; j < kRows; ++j) yb[j] += ta.z[j] * s;
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

// The LUT path's tile kernel and table builders for an ISA and mode.
// Returns whether the tile kernel adds z * sum(x) itself (else finish_tile does).
bool lut_kernels(int isa, bool fast, int q, bool kscales, TileFn* tile, BuildExactFn* build_exact,
                 BuildFastFn* build_fast) {
  *tile = fast ? tile_fast_scalar : tile_exact_scalar;
  *build_exact = build_exact_scalar;
  *build_fast = build_fast_scalar;
#ifdef QG_X86
  if (isa >= ISA_AVX2) {
    *build_exact = build_exact_avx2;
    *build_fast = build_fast_avx2;
    *tile = fast ? tile_fast_avx2 : tile_exact_avx2;
  }
  if (isa == ISA_AVX512) {
    if (kscales && (!fast || q <= 4)) {
      *tile = fast ? tile_fast_k_avx512 : tile_exact_k_avx512;
      return true;
    }
    *tile = fast ? tile_fast_avx512 : tile_exact_avx512;
  }
#else
  (void)isa;
  (void)q;
  (void)kscales;
#endif
  return false;
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
    s.gsum = c.offset || c.kscales ? reinterpret_cast<float*>(p + table_bytes + scale_bytes) : nullptr;
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
    if (c.gsum) group_sums(c, cc.xs0, 0, c.n * c.g.g);
    cc.prepared[slot] = true;
  }
  float* ybuf = reinterpret_cast<float*>(cc.ybufs + cc.ybuf_bytes * slot);
  const int64_t t0 = chunk * cc.tiles_per_chunk, t1 = std::min(c.g.mt, t0 + cc.tiles_per_chunk);
  for (int64_t t = t0; t < t1; ++t) {
    cc.tile(c, t, ybuf);
    finish_tile(c, t, ybuf, cc.y0);
  }
}


// ================================================================ many-row path: decode + GEMM
// Past a few input rows the LUT path's work (rows x q lookups per weight) exceeds a plain GEMM's, so each
// work item decodes one row tile (32 rows) of the packed code, a chunk of K at a time, into a cache-resident
// buffer and runs a register-blocked micro-kernel over every input row of the slab. Nothing bigger than one
// decoded chunk per thread is ever held.
// - f32 (exact mode everywhere; fast mode without AVX-512 VNNI): W chunk decoded to fp32 [kc][32] as
//   z - sum(alpha) + sum_i bit_i * 2 alpha_i (bit-exact up to fp32 rounding), x packed in panels of kNr rows.
// - i8 (fast mode with AVX-512 VNNI, as llama.cpp's Q8 dot): W decoded to u8 = round(w / s_w) + 128 with one
//   scale s_w = (|z| + sum|alpha_i|) / 127 per row and group; x quantized to s8 with one scale per row and
//   segment (<= 256 columns inside one group); vpdpbusd sums 4 products per int32 lane, starting from
//   -128 * sum(x_q) so the +128 weight bias cancels; each segment is rescaled to fp32 once.
constexpr int64_t kGemmSlabRows = 256;     // input rows whose panels are packed at once
constexpr int64_t kF32ChunkCols = 2048;    // decoded fp32 chunk: 32 x 2048 x 4 B = 256 KiB (L2)
constexpr int64_t kI8ChunkCols = 4096;     // decoded u8 chunk: 32 x 4096 B = 128 KiB
constexpr int kMaxNr = 16;
enum { GEMM_F32 = 0, GEMM_I8 = 1 };

struct GemmPlan {
  Geometry g;
  const uint8_t* packed;
  const float* alpha;
  const float* offset;
  const float* bias;
  int kind;
  int nr;                 // input rows per panel
  int64_t kp;             // padded columns (nb * 32)
  int64_t chunk_blocks;   // blocks per decoded chunk
  int64_t seg_blocks;     // i8: blocks per activation-scale segment (divides bpg)
  int64_t nseg;           // i8: segments in kp
  // per slab
  const float* x;         // slab rows of x [n][k]
  float* y;               // slab rows of y [n][m]
  int64_t n, nblk;        // rows, panels
  int64_t blk_per_range, nranges;
  float* xf;              // f32 panels [nblk][kp][nr]
  int8_t* xq;             // i8 panels [nblk][kp/4][nr][4]
  float* xsc;             // i8 scales [nblk][nseg][nr]
  int32_t* xcomp;         // i8 -128 * sum(x_q) [nblk][nseg][nr]
  // per slot scratch: decoded chunk, then the C accumulators [blk_per_range * nr][32]
  char* slots;
  size_t slot_bytes, wdec_bytes;
  // kernels
  void (*decode)(const GemmPlan&, int64_t t, int64_t b0, int64_t b1, void* out, float* wsc);
  void (*ukr)(const GemmPlan&, int64_t blk, int64_t b0, int64_t b1, const void* w, const float* wsc, float* c,
              int rows);
  void (*pack_x)(const GemmPlan&, int64_t blk);
};

// Largest divisor of bpg that is <= 8 (an activation-scale segment never straddles a group).
int64_t segment_blocks(int64_t bpg) {
  for (int64_t s = 8; s > 1; --s)
    if (bpg % s == 0) return s;
  return 1;
}

// ---------------------------------------------------------------- portable f32 pieces
// Inlined into each ISA's wrapper, so the compiler vectorizes it for that ISA.
__attribute__((always_inline)) inline void decode_f32_body(const GemmPlan& P, int64_t t, int64_t b0, int64_t b1,
                                                           float* out) {
  const Geometry& g = P.g;
  const int q = g.q;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t grp = b / g.bpg;
    const float* at = P.alpha + (t * g.g + grp) * q * kRows;
    alignas(64) float base[kRows];
    alignas(64) float two[8][kRows];
    for (int r = 0; r < kRows; ++r) base[r] = P.offset ? P.offset[(t * g.g + grp) * kRows + r] : 0.f;
    for (int i = 0; i < q; ++i)
      for (int r = 0; r < kRows; ++r) {
        base[r] -= at[i * kRows + r];
        two[i][r] = 2.f * at[i * kRows + r];
      }
    const uint8_t* kp = P.packed + (t * g.nb + b) * q * kBlockBytes;
    float* o = out + (b - b0) * kBlock * kRows;
    for (int col = 0; col < kBlock; ++col) {
      const int p = col >> 3, s = col & 7;
      float w[kRows];
      for (int r = 0; r < kRows; ++r) w[r] = base[r];
      for (int i = 0; i < q; ++i) {
        const uint8_t* kb = kp + i * kBlockBytes + p * kRows;
        for (int r = 0; r < kRows; ++r) w[r] += ((kb[r] >> s) & 1) ? two[i][r] : 0.f;
      }
      for (int r = 0; r < kRows; ++r) o[col * kRows + r] = w[r];
    }
  }
}

// x rows of panel blk -> [kp][nr] in padded column space (zeros in padding columns and rows >= n).
__attribute__((always_inline)) inline void pack_x_f32_body(const GemmPlan& P, int64_t blk) {
  const Geometry& g = P.g;
  const int nr = P.nr;
  float* dst = P.xf + blk * P.kp * nr;
  for (int r = 0; r < nr; ++r) {
    const int64_t row = blk * nr + r;
    if (row >= P.n) {
      for (int64_t c = 0; c < P.kp; ++c) dst[c * nr + r] = 0.f;
      continue;
    }
    const float* xr = P.x + row * g.k;
    for (int64_t b = 0; b < g.nb; ++b) {
      int64_t k0, cnt;
      block_span(g, b, &k0, &cnt);
      float* d = dst + b * kBlock * nr + r;
      for (int64_t j = 0; j < cnt; ++j) d[j * nr] = xr[k0 + j];
      for (int64_t j = cnt; j < kBlock; ++j) d[j * nr] = 0.f;
    }
  }
}

// C[rows][32] += X[rows][kc] * W[kc][32] (X panel stride nr, W chunk [kc][32]).
__attribute__((always_inline)) inline void ukr_f32_body(const GemmPlan& P, int64_t blk, int64_t b0, int64_t b1,
                                                        const void* wv, float* c, int rows) {
  const int nr = P.nr;
  const float* xp = P.xf + (blk * P.kp + b0 * kBlock) * nr;
  const float* w = static_cast<const float*>(wv);
  const int64_t kc = (b1 - b0) * kBlock;
  for (int r = 0; r < rows; ++r) {
    float acc[kRows];
    for (int j = 0; j < kRows; ++j) acc[j] = c[r * kRows + j];
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float xv = xp[kk * nr + r];
      for (int j = 0; j < kRows; ++j) acc[j] += xv * w[kk * kRows + j];
    }
    for (int j = 0; j < kRows; ++j) c[r * kRows + j] = acc[j];
  }
}

void decode_f32_scalar(const GemmPlan& P, int64_t t, int64_t b0, int64_t b1, void* out, float*) {
  decode_f32_body(P, t, b0, b1, static_cast<float*>(out));
}
void pack_x_f32_scalar(const GemmPlan& P, int64_t blk) { pack_x_f32_body(P, blk); }
void ukr_f32_scalar(const GemmPlan& P, int64_t blk, int64_t b0, int64_t b1, const void* w, const float*, float* c,
                    int rows) {
  ukr_f32_body(P, blk, b0, b1, w, c, rows);
}

#ifdef QG_X86
// ---------------------------------------------------------------- AVX2 f32 (6 rows x 16 columns per pass)
constexpr int kNrAvx2 = 6;

QG_AVX2 void decode_f32_avx2(const GemmPlan& P, int64_t t, int64_t b0, int64_t b1, void* out, float*) {
  decode_f32_body(P, t, b0, b1, static_cast<float*>(out));
}
QG_AVX2 void pack_x_f32_avx2(const GemmPlan& P, int64_t blk) { pack_x_f32_body(P, blk); }

template <int R>
QG_AVX2 void ukr_f32_avx2_rows(const float* xp, const float* w, int64_t kc, float* c) {
  for (int h = 0; h < 2; ++h) {  // columns 0-15, then 16-31
    __m256 a0[R], a1[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_loadu_ps(c + r * kRows + 16 * h);
      a1[r] = _mm256_loadu_ps(c + r * kRows + 16 * h + 8);
    }
    const float* wk = w + 16 * h;
    const float* xk = xp;
    for (int64_t kk = 0; kk < kc; ++kk, wk += kRows, xk += kNrAvx2) {
      const __m256 w0 = _mm256_load_ps(wk), w1 = _mm256_load_ps(wk + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(xk + r);
        a0[r] = _mm256_fmadd_ps(xb, w0, a0[r]);
        a1[r] = _mm256_fmadd_ps(xb, w1, a1[r]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(c + r * kRows + 16 * h, a0[r]);
      _mm256_storeu_ps(c + r * kRows + 16 * h + 8, a1[r]);
    }
  }
}

QG_AVX2 void ukr_f32_avx2(const GemmPlan& P, int64_t blk, int64_t b0, int64_t b1, const void* wv, const float*,
                          float* c, int rows) {
  const float* xp = P.xf + (blk * P.kp + b0 * kBlock) * kNrAvx2;
  const float* w = static_cast<const float*>(wv);
  const int64_t kc = (b1 - b0) * kBlock;
  switch (rows) {
    case 1: ukr_f32_avx2_rows<1>(xp, w, kc, c); break;
    case 2: ukr_f32_avx2_rows<2>(xp, w, kc, c); break;
    case 3: ukr_f32_avx2_rows<3>(xp, w, kc, c); break;
    case 4: ukr_f32_avx2_rows<4>(xp, w, kc, c); break;
    case 5: ukr_f32_avx2_rows<5>(xp, w, kc, c); break;
    default: ukr_f32_avx2_rows<6>(xp, w, kc, c); break;
  }
}

// ---------------------------------------------------------------- AVX-512 f32 (12 rows x 32 columns) and i8
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define QG_AVX512VL __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vbmi")))
#define QG_AVX512VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))
constexpr int kNrAvx512 = 12;

QG_AVX512VL void pack_x_f32_avx512(const GemmPlan& P, int64_t blk) { pack_x_f32_body(P, blk); }

// Per block: base = z - sum(alpha), two_i = 2 alpha_i for rows 0-15 / 16-31.
struct BlockScalesAvx512 {
  __m512 base0, base1, two0[8], two1[8];
};

QG_AVX512VL inline void block_scales_avx512(const GemmPlan& P, int64_t t, int64_t grp, BlockScalesAvx512* s,
                                            __m512* absum0, __m512* absum1) {
  const Geometry& g = P.g;
  const float* at = P.alpha + (t * g.g + grp) * g.q * kRows;
  if (P.offset) {
    const float* zt = P.offset + (t * g.g + grp) * kRows;
    s->base0 = _mm512_loadu_ps(zt);
    s->base1 = _mm512_loadu_ps(zt + 16);
  } else {
    s->base0 = s->base1 = _mm512_setzero_ps();
  }
  __m512 ab0 = _mm512_abs_ps(s->base0), ab1 = _mm512_abs_ps(s->base1);
  for (int i = 0; i < g.q; ++i) {
    const __m512 a0 = _mm512_loadu_ps(at + i * kRows), a1 = _mm512_loadu_ps(at + i * kRows + 16);
    s->base0 = _mm512_sub_ps(s->base0, a0);
    s->base1 = _mm512_sub_ps(s->base1, a1);
    s->two0[i] = _mm512_add_ps(a0, a0);
    s->two1[i] = _mm512_add_ps(a1, a1);
    ab0 = _mm512_add_ps(ab0, _mm512_abs_ps(a0));
    ab1 = _mm512_add_ps(ab1, _mm512_abs_ps(a1));
  }
  *absum0 = ab0;
  *absum1 = ab1;
}

// Column s of the 8 columns whose bits are in v[i] (32 rows of plane i): fp32 values of rows 0-15 / 16-31.
QG_AVX512VL inline void decode_col_avx512(const BlockScalesAvx512& s, const __m256i* v, int q, int bit,
                                          __m512* w0, __m512* w1) {
  const __m256i mb = _mm256_set1_epi8(static_cast<char>(1 << bit));
  __m512 a = s.base0, b = s.base1;
  for (int i = 0; i < q; ++i) {
    const __mmask32 mk = _mm256_test_epi8_mask(v[i], mb);
    a = _mm512_mask_add_ps(a, static_cast<__mmask16>(mk), a, s.two0[i]);
    b = _mm512_mask_add_ps(b, static_cast<__mmask16>(mk >> 16), b, s.two1[i]);
  }
  *w0 = a;
  *w1 = b;
}

QG_AVX512VL void decode_f32_avx512(const GemmPlan& P, int64_t t, int64_t b0, int64_t b1, void* outv, float*) {
  const Geometry& g = P.g;
  const int q = g.q;
  float* out = static_cast<float*>(outv);
  BlockScalesAvx512 s;
  int64_t last_grp = -1;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t grp = b / g.bpg;
    if (grp != last_grp) {
      __m512 u0, u1;
      block_scales_avx512(P, t, grp, &s, &u0, &u1);
      last_grp = grp;
    }
    const uint8_t* kp = P.packed + (t * g.nb + b) * q * kBlockBytes;
    float* o = out + (b - b0) * kBlock * kRows;
    for (int p = 0; p < 4; ++p) {
      __m256i v[8];
      for (int i = 0; i < q; ++i)
        v[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + i * kBlockBytes + p * kRows));
#pragma GCC unroll 8
      for (int bit = 0; bit < 8; ++bit) {
        __m512 w0, w1;
        decode_col_avx512(s, v, q, bit, &w0, &w1);
        _mm512_store_ps(o + (8 * p + bit) * kRows, w0);
        _mm512_store_ps(o + (8 * p + bit) * kRows + 16, w1);
      }
    }
  }
}

template <int R>
QG_AVX512VL void ukr_f32_avx512_rows(const float* xp, const float* w, int64_t kc, float* c) {
  __m512 a0[R], a1[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    a0[r] = _mm512_loadu_ps(c + r * kRows);
    a1[r] = _mm512_loadu_ps(c + r * kRows + 16);
  }
  for (int64_t kk = 0; kk < kc; ++kk, w += kRows, xp += kNrAvx512) {
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(xp[r]);
      a0[r] = _mm512_fmadd_ps(xb, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xb, w1, a1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * kRows, a0[r]);
    _mm512_storeu_ps(c + r * kRows + 16, a1[r]);
  }
}

QG_AVX512VL void ukr_f32_avx512(const GemmPlan& P, int64_t blk, int64_t b0, int64_t b1, const void* wv,
                                const float*, float* c, int rows) {
  const float* xp = P.xf + (blk * P.kp + b0 * kBlock) * kNrAvx512;
  const float* w = static_cast<const float*>(wv);
  const int64_t kc = (b1 - b0) * kBlock;
  switch (rows) {
    case 1: ukr_f32_avx512_rows<1>(xp, w, kc, c); break;
    case 2: ukr_f32_avx512_rows<2>(xp, w, kc, c); break;
    case 3: ukr_f32_avx512_rows<3>(xp, w, kc, c); break;
    case 4: ukr_f32_avx512_rows<4>(xp, w, kc, c); break;
    case 5: ukr_f32_avx512_rows<5>(xp, w, kc, c); break;
    case 6: ukr_f32_avx512_rows<6>(xp, w, kc, c); break;
    case 7: ukr_f32_avx512_rows<7>(xp, w, kc, c); break;
    case 8: ukr_f32_avx512_rows<8>(xp, w, kc, c); break;
    case 9: ukr_f32_avx512_rows<9>(xp, w, kc, c); break;
    case 10: ukr_f32_avx512_rows<10>(xp, w, kc, c); break;
    case 11: ukr_f32_avx512_rows<11>(xp, w, kc, c); break;
    default: ukr_f32_avx512_rows<12>(xp, w, kc, c); break;
  }
}

// u8 chunk [kc/4][32][4] = w_q + 128 with w_q ~ w / s_w, s_w = (|z| + sum|alpha_i|) / 127 per row and group;
// wsc[seg][32] = s_w of each segment of the chunk. Decoded in 16-bit fixed point (8 fraction bits, offset so
// every partial sum is a uint16): V = B + sum_i bit_i * T_i with B = round(256 (z - sum alpha) / s_w) + 32896,
// T_i = round(512 alpha_i / s_w); w_q + 128 = V >> 8. |w_q s_w - w| <= s_w (1/2 + (q + 2) / 512): the rounding
// of B and each T_i adds at most 1/512 step each (+ one for fp32 products), the final shift 1/2 step.
// 32 rows of round(v * inv) + add as 16-bit lanes (rows 0-15 from lo, 16-31 from hi; low 16 bits kept).
QG_AVX512VL inline __m512i fixed16_avx512(__m512 lo, __m512 hi, __m512 inv0, __m512 inv1, __m512i add) {
  const __m256i l = _mm512_cvtepi32_epi16(_mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv0)), add));
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv1)), add));
  return _mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1);
}

QG_AVX512VL void decode_i8_avx512(const GemmPlan& P, int64_t t, int64_t b0, int64_t b1, void* outv, float* wsc) {
  const Geometry& g = P.g;
  const int q = g.q;
  uint8_t* out = static_cast<uint8_t*>(outv);
  const __m512 k127 = _mm512_set1_ps(127.f), k32512 = _mm512_set1_ps(127.f * 256.f);
  const __m512i off = _mm512_set1_epi32(32896);  // 128 * 256 (the u8 bias) + 128 (rounding of >> 8)
  __m512 sw0 = _mm512_setzero_ps(), sw1 = sw0;
  __m512i base16 = _mm512_setzero_si512(), two16[8];
  int64_t last_grp = -1;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t grp = b / g.bpg;
    if (grp != last_grp) {
      BlockScalesAvx512 s;
      __m512 ab0, ab1;
      block_scales_avx512(P, t, grp, &s, &ab0, &ab1);
      sw0 = _mm512_div_ps(ab0, k127);
      sw1 = _mm512_div_ps(ab1, k127);
      // 256 / s_w, or 0 where the whole group is 0 (then every weight is 0 too).
      const __m512 i0 = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(ab0, _mm512_setzero_ps(), _CMP_GT_OQ), k32512, ab0);
      const __m512 i1 = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(ab1, _mm512_setzero_ps(), _CMP_GT_OQ), k32512, ab1);
      base16 = fixed16_avx512(s.base0, s.base1, i0, i1, off);
      for (int i = 0; i < q; ++i) two16[i] = fixed16_avx512(s.two0[i], s.two1[i], i0, i1, _mm512_setzero_si512());
      last_grp = grp;
    }
    if ((b - b0) % P.seg_blocks == 0) {
      float* sv = wsc + (b - b0) / P.seg_blocks * kRows;
      _mm512_storeu_ps(sv, sw0);
      _mm512_storeu_ps(sv + 16, sw1);
    }
    const uint8_t* kp = P.packed + (t * g.nb + b) * q * kBlockBytes;
    uint8_t* o = out + (b - b0) * kBlock * kRows;
    for (int p = 0; p < 4; ++p) {
      __m256i v[8];
      for (int i = 0; i < q; ++i)
        v[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + i * kBlockBytes + p * kRows));
#pragma GCC unroll 2
      for (int u = 0; u < 2; ++u) {
        __m256i c[4];  // columns 8p + 4u + j, u8 of rows 0-31
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i mb = _mm256_set1_epi8(static_cast<char>(1 << (4 * u + j)));
          __m512i acc = base16;
          for (int i = 0; i < q; ++i)
            acc = _mm512_mask_add_epi16(acc, _mm256_test_epi8_mask(v[i], mb), acc, two16[i]);
          c[j] = _mm512_cvtepi16_epi8(_mm512_srli_epi16(acc, 8));
        }
        // [32 rows][4 columns]: per 128-bit lane, rows 0-3, 4-7, 8-11, 12-15 (lane 1: rows 16-31).
        const __m256i t0 = _mm256_unpacklo_epi8(c[0], c[1]), t1 = _mm256_unpackhi_epi8(c[0], c[1]);
        const __m256i t2 = _mm256_unpacklo_epi8(c[2], c[3]), t3 = _mm256_unpackhi_epi8(c[2], c[3]);
        const __m256i u0 = _mm256_unpacklo_epi16(t0, t2), u1 = _mm256_unpackhi_epi16(t0, t2);
        const __m256i u2 = _mm256_unpacklo_epi16(t1, t3), u3 = _mm256_unpackhi_epi16(t1, t3);
        __m256i* d = reinterpret_cast<__m256i*>(o + (8 * p + 4 * u) * kRows);
        _mm256_store_si256(d + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
        _mm256_store_si256(d + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
        _mm256_store_si256(d + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
        _mm256_store_si256(d + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
      }
    }
  }
}

// Panel blk of x -> s8 [kp/4][nr][4] with one scale per (row, segment); xcomp = -128 * sum(x_q).
QG_AVX512VL void pack_x_i8_avx512(const GemmPlan& P, int64_t blk) {
  const Geometry& g = P.g;
  const int nr = P.nr;
  const int64_t seg_cols = P.seg_blocks * kBlock;
  const bool dense = g.gp == g.gs && g.k % g.gs == 0;  // padded space == column space
  int8_t* dst = P.xq + blk * P.kp * nr;
  float* sc = P.xsc + blk * P.nseg * nr;
  int32_t* comp = P.xcomp + blk * P.nseg * nr;
  alignas(64) float tmp[8 * kBlock];
  for (int r = 0; r < nr; ++r) {
    const int64_t row = blk * nr + r;
    for (int64_t sg = 0; sg < P.nseg; ++sg) {
      const int64_t c0 = sg * seg_cols;
      int32_t* d32 = reinterpret_cast<int32_t*>(dst) + (c0 / 4) * nr + r;
      if (row >= P.n) {
        for (int64_t u = 0; u < seg_cols / 4; ++u) d32[u * nr] = 0;
        sc[sg * nr + r] = 0.f;
        comp[sg * nr + r] = 0;
        continue;
      }
      const float* src;
      if (dense) {
        src = P.x + row * g.k + c0;
      } else {
        for (int64_t bb = 0; bb < P.seg_blocks; ++bb) {
          int64_t k0, cnt;
          block_span(g, c0 / kBlock + bb, &k0, &cnt);
          for (int64_t j = 0; j < kBlock; ++j) tmp[bb * kBlock + j] = j < cnt ? P.x[row * g.k + k0 + j] : 0.f;
        }
        src = tmp;
      }
      __m512 mx = _mm512_setzero_ps();
      for (int64_t j = 0; j < seg_cols; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(src + j)));
      const float amax = _mm512_reduce_max_ps(mx);
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i isum = _mm512_setzero_si512();
      for (int64_t j = 0; j < seg_cols; j += 16) {
        const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + j), vinv));
        isum = _mm512_add_epi32(isum, qi);
        const __m128i qb = _mm512_cvtsepi32_epi8(qi);
        int32_t* d = d32 + (j / 4) * nr;
        d[0] = _mm_extract_epi32(qb, 0);
        d[nr] = _mm_extract_epi32(qb, 1);
        d[2 * nr] = _mm_extract_epi32(qb, 2);
        d[3 * nr] = _mm_extract_epi32(qb, 3);
      }
      sc[sg * nr + r] = amax / 127.f;
      comp[sg * nr + r] = -128 * _mm512_reduce_add_epi32(isum);
    }
  }
}

// acc += 4-byte dot products of u8 w and s8 x, in place (GCC 12 otherwise copies each accumulator per step).
#define QG_DPBUSD(acc, w, x) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x))

template <int R>
QG_AVX512VNNI void ukr_i8_avx512_rows(const int8_t* xq, const float* xsc, const int32_t* xcomp, const uint8_t* w,
                                      const float* wsc, int64_t nsegc, int64_t seg_steps, float* c) {
  for (int64_t sg = 0; sg < nsegc; ++sg) {
    __m512i a0[R], a1[R];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_set1_epi32(xcomp[sg * kNrAvx512 + r]);
    for (int64_t s = 0; s < seg_steps; ++s, w += 4 * kRows, xq += 4 * kNrAvx512) {
      const __m512i w0 = _mm512_load_si512(w), w1 = _mm512_load_si512(w + 64);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        int32_t xv;
        std::memcpy(&xv, xq + 4 * r, 4);
        const __m512i xb = _mm512_set1_epi32(xv);
        QG_DPBUSD(a0[r], w0, xb);
        QG_DPBUSD(a1[r], w1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(wsc + sg * kRows), s1 = _mm512_loadu_ps(wsc + sg * kRows + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(xsc[sg * kNrAvx512 + r]);
      float* cr = c + r * kRows;
      _mm512_storeu_ps(cr, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[r]), _mm512_mul_ps(s0, xs), _mm512_loadu_ps(cr)));
      _mm512_storeu_ps(cr + 16,
                       _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[r]), _mm512_mul_ps(s1, xs), _mm512_loadu_ps(cr + 16)));
    }
  }
}

QG_AVX512VNNI void ukr_i8_avx512(const GemmPlan& P, int64_t blk, int64_t b0, int64_t b1, const void* wv,
                                 const float* wsc, float* c, int rows) {
  const int8_t* xq = P.xq + (blk * P.kp + b0 * kBlock) * kNrAvx512;
  const int64_t s0 = b0 / P.seg_blocks;
  const float* xsc = P.xsc + (blk * P.nseg + s0) * kNrAvx512;
  const int32_t* xcomp = P.xcomp + (blk * P.nseg + s0) * kNrAvx512;
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  const int64_t nsegc = (b1 - b0) / P.seg_blocks, steps = P.seg_blocks * kBlock / 4;
  switch (rows) {
    case 1: ukr_i8_avx512_rows<1>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 2: ukr_i8_avx512_rows<2>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 3: ukr_i8_avx512_rows<3>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 4: ukr_i8_avx512_rows<4>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 5: ukr_i8_avx512_rows<5>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 6: ukr_i8_avx512_rows<6>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 7: ukr_i8_avx512_rows<7>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 8: ukr_i8_avx512_rows<8>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 9: ukr_i8_avx512_rows<9>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 10: ukr_i8_avx512_rows<10>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    case 11: ukr_i8_avx512_rows<11>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
    default: ukr_i8_avx512_rows<12>(xq, xsc, xcomp, w, wsc, nsegc, steps, c); break;
  }
}
#pragma GCC diagnostic pop
#endif  // QG_X86

bool cpu_has_vnni() {
#ifdef QG_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

void gemm_pack_chunk(void* ctx, int, int64_t blk) {
  const GemmPlan& P = *static_cast<const GemmPlan*>(ctx);
  P.pack_x(P, blk);
}

// Work item = (row tile, range of panels): decode the tile chunk by chunk, run every panel of the range.
void gemm_item(void* ctx, int slot, int64_t item) {
  const GemmPlan& P = *static_cast<const GemmPlan*>(ctx);
  const Geometry& g = P.g;
  const int64_t t = item / P.nranges, rr = item % P.nranges;
  const int64_t blk0 = rr * P.blk_per_range, blk1 = std::min(P.nblk, blk0 + P.blk_per_range);
  if (blk0 >= blk1) return;
  char* base = P.slots + P.slot_bytes * slot;
  void* wdec = base;
  float* wsc = reinterpret_cast<float*>(base + P.wdec_bytes);
  float* cbuf = reinterpret_cast<float*>(base + P.wdec_bytes + align64((P.chunk_blocks / P.seg_blocks + 1) *
                                                                       kRows * sizeof(float)));
  const int64_t crow = static_cast<int64_t>(P.nr) * kRows;
  std::memset(cbuf, 0, sizeof(float) * crow * (blk1 - blk0));
  for (int64_t b0 = 0; b0 < g.nb; b0 += P.chunk_blocks) {
    const int64_t b1 = std::min(g.nb, b0 + P.chunk_blocks);
    P.decode(P, t, b0, b1, wdec, wsc);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int rows = static_cast<int>(std::min<int64_t>(P.nr, P.n - blk * P.nr));
      P.ukr(P, blk, b0, b1, wdec, wsc, cbuf + (blk - blk0) * crow, rows);
    }
  }
  const int64_t mrows = std::min<int64_t>(kRows, g.m - t * kRows);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t rows = std::min<int64_t>(P.nr, P.n - blk * P.nr);
    for (int64_t r = 0; r < rows; ++r) {
      const float* cr = cbuf + (blk - blk0) * crow + r * kRows;
      float* yr = P.y + (blk * P.nr + r) * g.m + t * kRows;
      if (P.bias) {
        for (int64_t j = 0; j < mrows; ++j) yr[j] = cr[j] + P.bias[t * kRows + j];
      } else {
        for (int64_t j = 0; j < mrows; ++j) yr[j] = cr[j];
      }
    }
  }
}

// Kernels and chunk sizes for this geometry, ISA and mode (no buffers yet).
void plan_gemm(const Geometry& g, int isa, bool fast, GemmPlan& P) {
  P.g = g;
  P.kp = g.nb * kBlock;
  P.kind = GEMM_F32;
  P.seg_blocks = 1;
  P.nr = 4;
  P.decode = decode_f32_scalar;
  P.ukr = ukr_f32_scalar;
  P.pack_x = pack_x_f32_scalar;
#ifdef QG_X86
  if (isa >= ISA_AVX2) {
    P.nr = kNrAvx2;
    P.decode = decode_f32_avx2;
    P.ukr = ukr_f32_avx2;
    P.pack_x = pack_x_f32_avx2;
  }
  if (isa == ISA_AVX512) {
    P.nr = kNrAvx512;
    P.decode = decode_f32_avx512;
    P.ukr = ukr_f32_avx512;
    P.pack_x = pack_x_f32_avx512;
    if (fast && cpu_has_vnni()) {
      P.kind = GEMM_I8;
      P.decode = decode_i8_avx512;
      P.ukr = ukr_i8_avx512;
      P.pack_x = pack_x_i8_avx512;
    }
  }
#endif
  (void)fast;
  (void)isa;
  if (P.kind == GEMM_I8) {
    P.seg_blocks = segment_blocks(g.bpg);
    P.nseg = g.nb / P.seg_blocks;
    const int64_t seg_cols = P.seg_blocks * kBlock;
    P.chunk_blocks = std::min(g.nb, std::max<int64_t>(1, kI8ChunkCols / seg_cols) * P.seg_blocks);
    P.wdec_bytes = align64(P.chunk_blocks * kBlock * kRows);
  } else {
    P.chunk_blocks = std::min<int64_t>(g.nb, kF32ChunkCols / kBlock);
    P.wdec_bytes = align64(P.chunk_blocks * kBlock * kRows * sizeof(float));
  }
}

// Bytes of the per-call buffers: activation panels (+ scales) for one slab, and one slot per thread (a decoded
// weight chunk, its scales, the accumulators of one range of panels).
struct GemmBuffers {
  size_t xbytes, sbytes, slot_bytes, wdec_bytes;
  int64_t slab, slab_blk, blk_per_range;
  int nt;
};

GemmBuffers gemm_buffers(const GemmPlan& P, int64_t n, int nt_max) {
  const Geometry& g = P.g;
  GemmBuffers B;
  B.slab = std::min(n, kGemmSlabRows);
  B.slab_blk = (B.slab + P.nr - 1) / P.nr;
  // Enough items for every thread: split the panels of a slab when there are few row tiles.
  const int64_t want = 4 * static_cast<int64_t>(nt_max);
  int64_t nranges = g.mt >= want ? 1 : std::min<int64_t>(B.slab_blk, (want + g.mt - 1) / g.mt);
  B.blk_per_range = (B.slab_blk + nranges - 1) / nranges;
  nranges = (B.slab_blk + B.blk_per_range - 1) / B.blk_per_range;
  B.nt = static_cast<int>(std::min<int64_t>(nt_max, g.mt * nranges));
  B.xbytes = P.kind == GEMM_I8 ? align64(B.slab_blk * P.kp * P.nr) : align64(B.slab_blk * P.kp * P.nr * 4);
  B.sbytes = P.kind == GEMM_I8 ? align64(B.slab_blk * P.nseg * P.nr * sizeof(float)) : 0;
  const size_t wsc_bytes = align64((P.chunk_blocks / P.seg_blocks + 1) * kRows * sizeof(float));
  B.wdec_bytes = P.wdec_bytes;
  B.slot_bytes = P.wdec_bytes + wsc_bytes + align64(B.blk_per_range * P.nr * kRows * sizeof(float));
  return B;
}

int run_gemm(const Geometry& g, int isa, bool fast, const float* x, int64_t n, const uint8_t* packed,
             const float* alpha, const float* offset, const float* bias, float* y) {
  GemmPlan P{};
  plan_gemm(g, isa, fast, P);
  P.packed = packed;
  P.alpha = alpha;
  P.offset = offset;
  P.bias = bias;
  const GemmBuffers B = gemm_buffers(P, n, num_threads());
  const int nt = B.nt;
  const int64_t slab = B.slab, blk_per_range = B.blk_per_range;
  const size_t xbytes = B.xbytes, sbytes = B.sbytes;
  P.slot_bytes = B.slot_bytes;
  char* base = static_cast<char*>(t_scratch.get(xbytes + 2 * sbytes + P.slot_bytes * nt));
  if (!base) return QG_ENOMEM;
  if (P.kind == GEMM_I8) {
    P.xq = reinterpret_cast<int8_t*>(base);
    P.xsc = reinterpret_cast<float*>(base + xbytes);
    P.xcomp = reinterpret_cast<int32_t*>(base + xbytes + sbytes);
  } else {
    P.xf = reinterpret_cast<float*>(base);
  }
  P.slots = base + xbytes + 2 * sbytes;
  P.blk_per_range = blk_per_range;
  qg::ThreadPool& pool = qg::ThreadPool::instance();
  for (int64_t n0 = 0; n0 < n; n0 += slab) {
    P.n = std::min(slab, n - n0);
    P.nblk = (P.n + P.nr - 1) / P.nr;
    P.nranges = (P.nblk + blk_per_range - 1) / blk_per_range;
    P.x = x + n0 * g.k;
    P.y = y + n0 * g.m;
    pool.run(nt, P.nblk, gemm_pack_chunk, &P);
    pool.run(nt, g.mt * P.nranges, gemm_item, &P);
  }
  return QG_OK;
}

// mode | QG_MODE_KSCALES: `alpha` points at the block-scale layout (and offset must be NULL).
bool split_mode(int* mode, const float** alpha, const uint8_t** kscales, const float* offset) {
  if (*mode & QG_MODE_KSCALES) {
    if (offset) return false;
    *kscales = reinterpret_cast<const uint8_t*>(*alpha);
    *alpha = nullptr;
    *mode &= ~QG_MODE_KSCALES;
  }
  return *mode == QG_MODE_EXACT || *mode == QG_MODE_FAST;
}

struct ExpandedScales {
  float* get(const Geometry& g) {
    const size_t need = static_cast<size_t>(g.mt * g.g * (g.q + 1) * kRows);
    if (buf.size() < need) buf.resize(need);
    return buf.data();
  }
  std::vector<float> buf;
};
thread_local ExpandedScales t_kscale_expanded;

// fp32 alpha [Mt][G][q][32] and offset [Mt][G][32] of a whole block-scaled matrix, tiles split over the pool.
struct ExpandCtx {
  Ctx c;
  float* alpha;
  float* offset;
  bool avx512;
};

void expand_tile_chunk(void* ctx, int, int64_t t) {
  const ExpandCtx& e = *static_cast<const ExpandCtx*>(ctx);
  const Geometry& g = e.c.g;
  float* a = e.alpha + t * g.g * g.q * kRows;
  float* z = e.offset + t * g.g * kRows;
#ifdef QG_X86
  if (e.avx512) {
    expand_tile_kscales_avx512(e.c, t, a, z);
    return;
  }
#endif
  TileAlpha ta(e.c, t);
  for (int64_t grp = 0; grp < g.g; ++grp) {
    std::memcpy(a + grp * g.q * kRows, ta.get(grp), sizeof(float) * g.q * kRows);
    std::memcpy(z + grp * kRows, ta.z, sizeof(float) * kRows);
  }
}

void expand_all_kscales(const Geometry& g, int isa, const uint8_t* kscales, float* alpha, float* offset) {
  ExpandCtx e{};
  e.c.g = g;
  e.c.kscales = kscales;
  e.alpha = alpha;
  e.offset = offset;
  e.avx512 = isa == ISA_AVX512;
  qg::ThreadPool::instance().run(static_cast<int>(std::min<int64_t>(num_threads(), g.mt)), g.mt, expand_tile_chunk, &e);
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

QG_API int qg_biqgemm_gemm_buffers(int64_t n, int64_t m, int64_t k, int q, int64_t group_size, int mode,
                                   int64_t* out) {
  Geometry g;
  if (!out || n < 1 || !make_geometry(m, k, q, group_size, &g)) return QG_EINVAL;
  if (mode != QG_MODE_EXACT && mode != QG_MODE_FAST) return QG_EINVAL;
  GemmPlan P{};
  plan_gemm(g, resolve_isa(), mode == QG_MODE_FAST, P);
  const GemmBuffers B = gemm_buffers(P, n, num_threads());
  const size_t wsc_bytes = align64((P.chunk_blocks / P.seg_blocks + 1) * kRows * sizeof(float));
  out[0] = static_cast<int64_t>(B.wdec_bytes + wsc_bytes);
  out[1] = static_cast<int64_t>(B.xbytes + 2 * B.sbytes);
  out[2] = static_cast<int64_t>(B.slot_bytes - B.wdec_bytes - wsc_bytes);
  out[3] = B.nt;
  return QG_OK;
}

QG_API int qg_biqgemm_gemm_int8(int mode) {
#ifdef QG_X86
  return mode == QG_MODE_FAST && resolve_isa() == ISA_AVX512 && cpu_has_vnni() ? 1 : 0;
#else
  (void)mode;
  return 0;
#endif
}

QG_API void qg_biqgemm_set_lut_max_rows(int mode, int64_t rows) {
  if (mode == QG_MODE_EXACT || mode == QG_MODE_FAST) g_lut_max_rows[mode] = rows < 0 ? -1 : rows;
}

QG_API int64_t qg_biqgemm_lut_max_rows(int mode) {
  return mode == QG_MODE_EXACT || mode == QG_MODE_FAST ? g_lut_max_rows[mode].load() : -1;
}

QG_API int qg_biqgemm_f32(const float* x, int64_t n, int64_t k, const void* packed, const float* alpha,
                          const float* offset, const float* bias, int64_t m, int q, int64_t group_size,
                          int mode, float* y) {
  return qg_biqgemm_f32_path(x, n, k, packed, alpha, offset, bias, m, q, group_size, mode, QG_PATH_AUTO, y);
}

QG_API int qg_biqgemm_f32_path(const float* x, int64_t n, int64_t k, const void* packed, const float* alpha_in,
                               const float* offset, const float* bias, int64_t m, int q, int64_t group_size,
                               int mode_in, int path, float* y) {
  Geometry g;
  const uint8_t* kscales = nullptr;
  const float* alpha = alpha_in;
  int mode = mode_in;
  if (!split_mode(&mode, &alpha, &kscales, offset)) return QG_EINVAL;
  if (!x || !packed || !(alpha || kscales) || !y || n < 0 || !make_geometry(m, k, q, group_size, &g)) return QG_EINVAL;
  if (path != QG_PATH_AUTO && path != QG_PATH_LUT && path != QG_PATH_GEMM) return QG_EINVAL;
  if (n == 0) return QG_OK;

  const int isa = resolve_isa();
  const bool fast = mode == QG_MODE_FAST;
  if (path == QG_PATH_AUTO) path = n > g_lut_max_rows[mode].load(std::memory_order_relaxed) ? QG_PATH_GEMM : QG_PATH_LUT;
  if (path == QG_PATH_GEMM) {
    if (kscales) {  // the GEMM path decodes whole tiles: expand the block scales to fp32 alpha / z once per call
      float* ex = t_kscale_expanded.get(g);
      if (!ex) return QG_ENOMEM;
      expand_all_kscales(g, isa, kscales, ex, ex + g.mt * g.g * q * kRows);
      return run_gemm(g, isa, fast, x, n, static_cast<const uint8_t*>(packed), ex, ex + g.mt * g.g * q * kRows,
                      bias, y);
    }
    return run_gemm(g, isa, fast, x, n, static_cast<const uint8_t*>(packed), alpha, offset, bias, y);
  }
  TileFn tile;
  BuildExactFn build_exact;
  BuildFastFn build_fast;
  const bool z_in_tile = lut_kernels(isa, fast, q, kscales != nullptr, &tile, &build_exact, &build_fast);

  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), g.mt));
  const int64_t slab = std::min(n, kBatchSlab);
  // Small batches: every thread builds its own tables on its first chunk (microseconds), so no thread
  // waits for another; larger batches share one set of tables built in parallel first.
  const bool private_tables = slab <= kPrivateTableRows;
  const size_t table_bytes = align64(slab * g.nb * kTable * (fast ? 1 : sizeof(float)));
  const size_t scale_bytes = fast ? align64(slab * g.nb * sizeof(float)) : 0;
  const size_t gsum_bytes = offset || kscales ? align64(slab * g.g * sizeof(float)) : 0;
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
  cc.c.kscales = kscales;
  cc.c.z_in_tile = z_in_tile;
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
      cc.build_items = cc.c.n * g.nb + (offset || kscales ? cc.c.n * g.g : 0);
      pool.run(nt, (cc.build_items + kBuildChunk - 1) / kBuildChunk, build_chunk, &cc);
    }
    pool.run(nt, (g.mt + cc.tiles_per_chunk - 1) / cc.tiles_per_chunk, tile_chunk, &cc);
  }
  return QG_OK;
}

QG_API int qg_biqgemm_lut_tiles(const float* x, int64_t k, const void* packed, const float* alpha_in,
                                const float* offset, const float* bias, int64_t m, int q, int64_t group_size,
                                int mode_in, int64_t tile_begin, int64_t tile_end, float* y) {
  Geometry g;
  const uint8_t* kscales = nullptr;
  const float* alpha = alpha_in;
  int mode = mode_in;
  if (!split_mode(&mode, &alpha, &kscales, offset)) return QG_EINVAL;
  if (!x || !packed || !(alpha || kscales) || !y || !make_geometry(m, k, q, group_size, &g)) return QG_EINVAL;
  if (tile_begin < 0 || tile_end > g.mt || tile_begin > tile_end) return QG_EINVAL;
  if (tile_begin == tile_end) return QG_OK;
  const bool fast = mode == QG_MODE_FAST;
  TileFn tile;
  BuildExactFn build_exact;
  BuildFastFn build_fast;
  const bool z_in_tile = lut_kernels(resolve_isa(), fast, q, kscales != nullptr, &tile, &build_exact, &build_fast);
  const size_t table_bytes = align64(g.nb * kTable * (fast ? 1 : sizeof(float)));
  const size_t scale_bytes = fast ? align64(g.nb * sizeof(float)) : 0;
  const size_t gsum_bytes = offset || kscales ? align64(g.g * sizeof(float)) : 0;
  char* base = static_cast<char*>(t_scratch.get(table_bytes + scale_bytes + gsum_bytes + kRows * sizeof(float)));
  if (!base) return QG_ENOMEM;
  Ctx c;
  c.g = g;
  c.packed = static_cast<const uint8_t*>(packed);
  c.alpha = alpha;
  c.kscales = kscales;
  c.z_in_tile = z_in_tile;
  c.offset = offset;
  c.bias = bias;
  c.n = 1;
  c.blocks_per_step = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocksPerStep, kStepTableBytes /
                                                                                      (kTable * (fast ? 1 : 4))));
  c.tf = fast ? nullptr : reinterpret_cast<float*>(base);
  c.tq = fast ? reinterpret_cast<int8_t*>(base) : nullptr;
  c.ts = fast ? reinterpret_cast<float*>(base + table_bytes) : nullptr;
  c.gsum = offset || kscales ? reinterpret_cast<float*>(base + table_bytes + scale_bytes) : nullptr;
  float* ybuf = reinterpret_cast<float*>(base + table_bytes + scale_bytes + gsum_bytes);
  build_tables(c, Builders{fast, build_exact, build_fast}, x, 0, g.nb);
  if (c.gsum) group_sums(c, x, 0, g.g);
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    tile(c, t, ybuf);
    finish_tile(c, t, ybuf, y);
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
