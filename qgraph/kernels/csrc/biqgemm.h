/* BiQGEMM CPU kernel: plain C ABI, no torch and no Python API, so any host (torch via ctypes, an
 * onnxruntime custom op, a C program) can call it with raw buffers.
 *
 * Semantics: y[n, m] = sum_k x[n, k] * W[m, k] (+ bias[m]) with W = z + sum_i alpha_i * B_i,
 * B_i in {-1, +1}, alpha (and z) constant over groups of `group_size` columns of a row.
 *
 * Offline layout "cpu-lut4" (built by the qg_biqgemm_pack* functions from the canonical BCQWeight
 * tensors planes uint8 [q, M, ceil(K/8)] LSB-first, alpha f32 [q, M, G], offset f32 [M, G]):
 *   rows are split in tiles of 32 (Mt = ceil(M/32)); each group of K is padded to gp = roundup(group_size, 32)
 *   columns and split in blocks of 32 columns (NB = G * gp/32 blocks), so no block straddles two groups.
 *   packed uint8 [Mt][NB][q][4][32]: byte [t][b][i][p][r] holds two 4-bit keys of row 32t+r, plane i:
 *     low nibble = columns 8p..8p+3 of block b, high nibble = columns 8p+4..8p+7 (bit s <-> column +s,
 *     1 <-> +1). Padding rows/columns are 0 (their activations are 0, so they add nothing).
 *   alpha  f32 [Mt][G][q][32], offset f32 [Mt][G][32] (0 in padding rows).
 *
 * Layout "cpu-lut4k" (uniform codes with block scales, w = d c - m; qgraph.quant.block_scaled): the same packed
 * bit-planes (bit i of code c), and instead of alpha/offset one uint8 buffer [Mt][128 + 48 G]: per tile fp16 D[32],
 * fp16 M[32], then per group 48 bytes: byte r (0..31) = (sc & 15) | (mc & 15) << 4 of row r, byte 32 + j (0..15) =
 * row j's (sc >> 4) | (mc >> 4) << 2 in its low nibble and row j + 16's in its high nibble (6-bit codes at most).
 * d = D * sc and m = M * mc in fp32; the kernel runs alpha_i = d 2^(i-1), z = d (2^q - 1) / 2 - m.
 */
#ifndef QG_BIQGEMM_H
#define QG_BIQGEMM_H

#include <stdint.h>

#if defined(_WIN32)
#define QG_API __declspec(dllexport)
#else
#define QG_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define QG_BIQGEMM_ABI 3
#define QG_TILE_ROWS 32
#define QG_BLOCK_K 32

enum { QG_MODE_EXACT = 0, QG_MODE_FAST = 1 };
/* Or'ed into a mode: `alpha` points at the block-scale layout "cpu-lut4k" (see above) and offset is NULL. */
#define QG_MODE_KSCALES 0x10
enum { QG_PATH_AUTO = 0, QG_PATH_LUT = 1, QG_PATH_GEMM = 2 };
#define QG_DEFAULT_LUT_MAX_ROWS_EXACT 4
#define QG_DEFAULT_LUT_MAX_ROWS_FAST 4
enum { QG_OK = 0, QG_EINVAL = -1, QG_ENOMEM = -2 };

/* ABI version of this header (bumped when a signature or the packed layout changes). */
QG_API int qg_biqgemm_abi_version(void);
/* The code path the next call takes: "avx512vbmi", "avx2" or "scalar" (honours QGRAPH_BIQGEMM_ISA). */
QG_API const char* qg_biqgemm_isa(void);
/* 1 if this CPU (and build) can run the named path, else 0. */
QG_API int qg_biqgemm_isa_supported(const char* name);
/* Threads for later calls (the caller plus pool workers); 0 = std::thread::hardware_concurrency(). */
QG_API void qg_biqgemm_set_num_threads(int n);

/* Sizes of the packed buffers, in bytes / floats (0 for invalid arguments). */
QG_API int64_t qg_biqgemm_packed_bytes(int64_t m, int64_t k, int q, int64_t group_size);
QG_API int64_t qg_biqgemm_alpha_floats(int64_t m, int64_t k, int q, int64_t group_size);
QG_API int64_t qg_biqgemm_offset_floats(int64_t m, int64_t k, int64_t group_size);

/* Canonical -> "cpu-lut4". `out` buffers must hold the sizes above. */
QG_API int qg_biqgemm_pack(const uint8_t* planes, int64_t m, int64_t k, int q, int64_t group_size,
                           uint8_t* out);
QG_API int qg_biqgemm_pack_alpha(const float* alpha, int64_t m, int64_t k, int q, int64_t group_size,
                                 float* out);
QG_API int qg_biqgemm_pack_offset(const float* offset, int64_t m, int64_t k, int64_t group_size, float* out);

/* y[n, m] (row-major, fp32) = x[n, k] (row-major, fp32) times the packed weight, plus offset and bias.
 * offset and bias may be NULL. mode: QG_MODE_EXACT (fp32 tables) or QG_MODE_FAST (int8 tables, one
 * scale per 32 activations). Returns QG_OK or a negative error code; never writes y on error. */
QG_API int qg_biqgemm_f32(const float* x, int64_t n, int64_t k, const void* packed, const float* alpha,
                          const float* offset, const float* bias, int64_t m, int q, int64_t group_size,
                          int mode, float* y);
/* The same with the path chosen by the caller: QG_PATH_AUTO (LUT up to qg_biqgemm_lut_max_rows(mode) input
 * rows, decode + GEMM above), QG_PATH_LUT or QG_PATH_GEMM. The GEMM path decodes one 32-row tile of the code at
 * a time, a chunk of K per step, into a per-thread buffer (at most 256 KiB) and never holds the whole matrix;
 * in fast mode on AVX-512 VNNI it quantizes x to int8 (one scale per row and segment of <= 256 columns inside a
 * group) and the decoded weights to int8 (one scale per row and group), elsewhere it is exact fp32. */
QG_API int qg_biqgemm_f32_path(const float* x, int64_t n, int64_t k, const void* packed, const float* alpha,
                               const float* offset, const float* bias, int64_t m, int q, int64_t group_size,
                               int mode, int path, float* y);
/* One input row (x[k]) on the LUT path, on the calling thread only, for row tiles [tile_begin, tile_end) (tiles of
 * QG_TILE_ROWS rows): writes y[r] for those rows (y is the whole [m] output). For hosts that split one product
 * between threads of their own (the native decode step); same arguments and results as qg_biqgemm_f32 otherwise. */
QG_API int qg_biqgemm_lut_tiles(const float* x, int64_t k, const void* packed, const float* alpha, const float* offset,
                                const float* bias, int64_t m, int q, int64_t group_size, int mode, int64_t tile_begin,
                                int64_t tile_end, float* y);
/* Buffers the GEMM path of an n-row call would use: out[0] = decoded weight chunk + its scales, per thread;
 * out[1] = activation panels (one slab of <= 256 rows, shared); out[2] = accumulators per thread; out[3] = threads.
 * The kernel keeps them (per calling thread) for later calls. */
QG_API int qg_biqgemm_gemm_buffers(int64_t n, int64_t m, int64_t k, int q, int64_t group_size, int mode,
                                   int64_t* out);
/* 1 if the GEMM path of the next call in this mode runs int8 (fast mode on AVX-512 VNNI), 0 if fp32. */
QG_API int qg_biqgemm_gemm_int8(int mode);
/* LUT-path row limit per mode (process-wide; rows < 0: never LUT). */
QG_API void qg_biqgemm_set_lut_max_rows(int mode, int64_t rows);
QG_API int64_t qg_biqgemm_lut_max_rows(int mode);

#ifdef __cplusplus
}
#endif

#endif
