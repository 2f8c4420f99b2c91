#include "ops/cpu/skinny_gemm.h"

#include <ATen/Parallel.h>

#include "ops/cpu/simd.h"

namespace lora_ext::cpu {

namespace {

// NB rows X[0..NB) against KB rows of W: NB*KB accumulators stay in registers.
template <int NB, int KB>
__attribute__((target("avx2,fma"))) void rowdot_block(const float* const* X, const float* W, int64_t K, float* out,
                                                      int64_t ldo) {
  __m256 acc[NB][KB];
#pragma GCC unroll 4
  for (int a = 0; a < NB; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < KB; ++b) acc[a][b] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t j = 0; j < K8; j += 8) {
    __m256 w[KB];
#pragma GCC unroll 8
    for (int b = 0; b < KB; ++b) w[b] = _mm256_loadu_ps(W + b * K + j);
#pragma GCC unroll 4
    for (int a = 0; a < NB; ++a) {
      const __m256 x = _mm256_loadu_ps(X[a] + j);
#pragma GCC unroll 4
      for (int b = 0; b < KB; ++b) acc[a][b] = _mm256_fmadd_ps(x, w[b], acc[a][b]);
    }
  }
#pragma GCC unroll 4
  for (int a = 0; a < NB; ++a) {
#pragma GCC unroll 4
    for (int b = 0; b < KB; ++b) {
      float s = hsum(acc[a][b]);
      for (int64_t j = K8; j < K; ++j) s += X[a][j] * W[b * K + j];
      out[a * ldo + b] = s;
    }
  }
}

template <int NB>
__attribute__((target("avx2,fma"))) void rowdot_rows(const float* const* X, const float* W, int64_t K, int64_t R,
                                                     float* out, int64_t ldo) {
  int64_t k0 = 0;
  if constexpr (NB == 1) {  // one row: 8 accumulator chains instead of 4 (FMA latency)
    for (; k0 + 8 <= R; k0 += 8) rowdot_block<1, 8>(X, W + k0 * K, K, out + k0, ldo);
  }
  for (; k0 + 4 <= R; k0 += 4) rowdot_block<NB, 4>(X, W + k0 * K, K, out + k0, ldo);
  switch (R - k0) {
    case 3:
      rowdot_block<NB, 3>(X, W + k0 * K, K, out + k0, ldo);
      break;
    case 2:
      rowdot_block<NB, 2>(X, W + k0 * K, K, out + k0, ldo);
      break;
    case 1:
      rowdot_block<NB, 1>(X, W + k0 * K, K, out + k0, ldo);
      break;
    default:
      break;
  }
}

// MB output rows, OV x 8 columns at a time from column o0 while they fit:
// y[m][o] += sum_k hs[m][k] * Wt[k][o]; MB * OV independent accumulator chains.
// Returns the first column not done.
template <int MB, int OV>
__attribute__((target("avx2,fma"))) int64_t expand_cols(const float* hs, int64_t R, const float* Wt, int64_t out,
                                                        float* const* y, int64_t o0) {
  int64_t o = o0;
  for (; o + 8 * OV <= out; o += 8 * OV) {
    __m256 acc[MB][OV];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < OV; ++v) acc[m][v] = _mm256_loadu_ps(y[m] + o + 8 * v);
    for (int64_t k = 0; k < R; ++k) {
      __m256 w[OV];
#pragma GCC unroll 4
      for (int v = 0; v < OV; ++v) w[v] = _mm256_loadu_ps(Wt + k * out + o + 8 * v);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const __m256 hk = _mm256_broadcast_ss(hs + m * R + k);
#pragma GCC unroll 4
        for (int v = 0; v < OV; ++v) acc[m][v] = _mm256_fmadd_ps(hk, w[v], acc[m][v]);
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < OV; ++v) _mm256_storeu_ps(y[m] + o + 8 * v, acc[m][v]);
  }
  return o;
}

template <int MB, int OV>
void expand_rows(const float* hs, int64_t R, const float* Wt, int64_t out, float* const* y) {
  int64_t o = expand_cols<MB, OV>(hs, R, Wt, out, y, 0);
  o = expand_cols<MB, 1>(hs, R, Wt, out, y, o);
  for (; o < out; ++o) {
    for (int m = 0; m < MB; ++m) {
      float v = y[m][o];
      for (int64_t k = 0; k < R; ++k) v += hs[m * R + k] * Wt[k * out + o];
      y[m][o] = v;
    }
  }
}

}  // namespace

bool has_avx2_fma() {
  return cpu_has_avx2_fma();
}

void rowdot_ptrs(const float* const* rows, int64_t nrows, const float* W, int64_t K, int64_t R, float* out,
                 int64_t ldo) {
  TORCH_INTERNAL_ASSERT(cpu_has_avx2_fma());
  int64_t m = 0;
  for (; m + 3 <= nrows; m += 3) rowdot_rows<3>(rows + m, W, K, R, out + m * ldo, ldo);
  if (nrows - m == 2) rowdot_rows<2>(rows + m, W, K, R, out + m * ldo, ldo);
  if (nrows - m == 1) rowdot_rows<1>(rows + m, W, K, R, out + m * ldo, ldo);
}

void expand_ptrs(const float* hs, int64_t nrows, const float* Wt, int64_t R, int64_t out, float* const* yrows) {
  TORCH_INTERNAL_ASSERT(cpu_has_avx2_fma());
  // 8 accumulator chains per step whatever the row count (FMA latency x throughput)
  int64_t m = 0;
  for (; m + 4 <= nrows; m += 4) expand_rows<4, 2>(hs + m * R, R, Wt, out, yrows + m);
  switch (nrows - m) {
    case 3:
      expand_rows<3, 2>(hs + m * R, R, Wt, out, yrows + m);
      break;
    case 2:
      expand_rows<2, 4>(hs + m * R, R, Wt, out, yrows + m);
      break;
    case 1:
      expand_rows<1, 4>(hs + m * R, R, Wt, out, yrows + m);
      break;
    default:
      break;
  }
}

bool skinny_rowdot(at::Tensor& out, const at::Tensor& X, const at::Tensor& W) {
  if (!cpu_has_avx2_fma()) return false;
  if (X.scalar_type() != at::kFloat || W.scalar_type() != at::kFloat || out.scalar_type() != at::kFloat) return false;
  if (X.dim() != 2 || W.dim() != 2 || out.dim() != 2) return false;
  if (X.stride(1) != 1 || !W.is_contiguous() || !out.is_contiguous()) return false;
  const int64_t N = X.size(0), K = X.size(1), R = W.size(0);
  TORCH_INTERNAL_ASSERT(W.size(1) == K && out.size(0) == N && out.size(1) == R);
  if (R > 256 || K < 32) return false;  // wide enough for BLAS, or too short to be worth it
  const float* xp = X.const_data_ptr<float>();
  const float* wp = W.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = X.stride(0);
  // Blocks of 3 rows: 3 x 4 accumulators + 4 weight vectors fit the 16 YMM registers.
  const int64_t nblocks = (N + 2) / 3;
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, K)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * 3, nb = std::min<int64_t>(3, N - n);
      const float* xr[3] = {xp + n * ldx, xp + (n + 1) * ldx, xp + (n + 2) * ldx};
      float* orow = op + n * R;
      if (nb == 3)
        rowdot_rows<3>(xr, wp, K, R, orow, R);
      else if (nb == 2)
        rowdot_rows<2>(xr, wp, K, R, orow, R);
      else
        rowdot_rows<1>(xr, wp, K, R, orow, R);
    }
  });
  return true;
}

}  // namespace lora_ext::cpu
