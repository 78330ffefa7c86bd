// LayerNorm forward and backward, row-wise over x [rows, cols], biased variance, f32
// statistics. Each templated body is instantiated as extern "C" NAME_f32 and NAME_bf16.
#include "common.cuh"

// Forward: y = (x - mean) * rstd * gamma + beta; writes mean[rows], rstd[rows] (f32).
// Launch: one warp per row, 8 warps (256 threads) per block, grid ceil(rows / 8).
// Two passes for the variance (mean first) so large offsets do not cancel.
template <typename T>
__device__ void layernorm_fwd(const T* __restrict__ x, const T* __restrict__ gamma,
                              const T* __restrict__ beta, T* __restrict__ y,
                              float* __restrict__ mean, float* __restrict__ rstd, int rows,
                              int cols, float eps) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * cols;
  T* yr = y + (int64_t)row * cols;
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) s += to_f(xr[c]);
  float m = warp_sum(s) / cols;
  float v = 0.f;
  for (int c = lane; c < cols; c += 32) {
    float d = to_f(xr[c]) - m;
    v += d * d;
  }
  float rs = rsqrtf(warp_sum(v) / cols + eps);
  for (int c = lane; c < cols; c += 32)
    yr[c] = from_f<T>((to_f(xr[c]) - m) * rs * to_f(gamma[c]) + to_f(beta[c]));
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = rs;
  }
}

// Backward, input gradient: dx = rstd * (g*dy - mean(g*dy) - xhat * mean(g*dy*xhat)).
// Launch: one warp per row, 8 warps per block, grid ceil(rows / 8).
template <typename T>
__device__ void layernorm_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x,
                                 const T* __restrict__ gamma, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, T* __restrict__ dx, int rows,
                                 int cols) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * cols;
  const T* dr = dy + (int64_t)row * cols;
  float m = mean[row], rs = rstd[row];
  float a = 0.f, b = 0.f;
  // __fmul_rn keeps g*dy rounded the same way in the mean and in each element (a contracted
  // fma would not), so a constant row, e.g. cols == 1, gets exactly zero gradient as on CPU.
  for (int c = lane; c < cols; c += 32) {
    float gd = __fmul_rn(to_f(gamma[c]), to_f(dr[c]));
    a += gd;
    b += gd * (to_f(xr[c]) - m) * rs;
  }
  a = warp_sum(a) / cols;
  b = warp_sum(b) / cols;
  T* out = dx + (int64_t)row * cols;
  for (int c = lane; c < cols; c += 32) {
    float xhat = (to_f(xr[c]) - m) * rs;
    out[c] = from_f<T>(rs * (__fmul_rn(to_f(gamma[c]), to_f(dr[c])) - a - xhat * b));
  }
}

// Backward, parameter gradients, first stage: for each chunk of `chunk` rows,
// pg[k, c] = sum over the chunk of dy * xhat, pb[k, c] = sum of dy (f32, [chunks, cols]).
// The host sums the chunks with sum_rows, which keeps the result deterministic (no atomics).
// Launch: grid (ceil(cols / 256), chunks), 256 threads, one column per thread (coalesced).
template <typename T>
__device__ void layernorm_bwd_params(const T* __restrict__ dy, const T* __restrict__ x,
                                     const float* __restrict__ mean,
                                     const float* __restrict__ rstd, float* __restrict__ pg,
                                     float* __restrict__ pb, int rows, int cols, int chunk) {
  int c = blockIdx.x * COL_BLOCK_THREADS + threadIdx.x;
  if (c >= cols) return;
  int r0 = blockIdx.y * chunk;
  int r1 = min(rows, r0 + chunk);
  float g = 0.f, b = 0.f;
  for (int r = r0; r < r1; ++r) {
    int64_t i = (int64_t)r * cols + c;
    float d = to_f(dy[i]);
    g += d * (to_f(x[i]) - mean[r]) * rstd[r];
    b += d;
  }
  pg[(int64_t)blockIdx.y * cols + c] = g;
  pb[(int64_t)blockIdx.y * cols + c] = b;
}

// Fused inference forms (no statistics kept). Both compute the row in f32 and round once.
// Launch (both): one warp per row, 8 warps (256 threads) per block, grid ceil(rows / 8);
// the row is re-read per pass (a 1024-wide row stays in L1).
//
// add_layernorm: y = LayerNorm(a + b), a, b, y [rows, cols].
template <typename T>
__device__ void add_layernorm_fwd(const T* __restrict__ a, const T* __restrict__ b,
                                  const T* __restrict__ gamma, const T* __restrict__ beta,
                                  T* __restrict__ y, int rows, int cols, float eps) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const int64_t o = (int64_t)row * cols;
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) s += to_f(a[o + c]) + to_f(b[o + c]);
  float m = warp_sum(s) / cols;
  float v = 0.f;
  for (int c = lane; c < cols; c += 32) {
    float d = to_f(a[o + c]) + to_f(b[o + c]) - m;
    v += d * d;
  }
  float rs = rsqrtf(warp_sum(v) / cols + eps);
  for (int c = lane; c < cols; c += 32)
    y[o + c] = from_f<T>((to_f(a[o + c]) + to_f(b[o + c]) - m) * rs * to_f(gamma[c]) +
                         to_f(beta[c]));
}

// add_layernorm for bf16 rows of K * 256 columns (BGE-M3's 1024: K = 4), the inference hot
// path: each lane loads its K x 8 values of a + b once with 16-byte loads and keeps them in
// registers for the mean, the variance and the output (the generic kernel reads a and b
// three times with 2-byte loads). Same launch as add_layernorm_fwd; the host picks it only
// where every pointer is 16-byte aligned.
template <int K>
__device__ void add_layernorm_fwd_vec(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                      const bf16* __restrict__ gamma,
                                      const bf16* __restrict__ beta, bf16* __restrict__ y,
                                      int rows, int cols, float eps) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const int64_t o = (int64_t)row * cols;
  float x[K][8];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int c = (k * 32 + lane) * 8;
    uint4 ra = *reinterpret_cast<const uint4*>(a + o + c);
    uint4 rb = *reinterpret_cast<const uint4*>(b + o + c);
    const bf16* ea = reinterpret_cast<const bf16*>(&ra);
    const bf16* eb = reinterpret_cast<const bf16*>(&rb);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      x[k][j] = to_f(ea[j]) + to_f(eb[j]);
      s += x[k][j];
    }
  }
  float m = warp_sum(s) / cols;
  float v = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float d = x[k][j] - m;
      v += d * d;
    }
  float rs = rsqrtf(warp_sum(v) / cols + eps);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int c = (k * 32 + lane) * 8;
    uint4 rg = *reinterpret_cast<const uint4*>(gamma + c);
    uint4 rb = *reinterpret_cast<const uint4*>(beta + c);
    const bf16* eg = reinterpret_cast<const bf16*>(&rg);
    const bf16* eb = reinterpret_cast<const bf16*>(&rb);
    uint4 out;
    bf16* eo = reinterpret_cast<bf16*>(&out);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      eo[j] = from_f<bf16>((x[k][j] - m) * rs * to_f(eg[j]) + to_f(eb[j]));
    *reinterpret_cast<uint4*>(y + o + c) = out;
  }
}

#define INSTANTIATE_VEC(K)                                                                  \
  extern "C" __global__ void add_layernorm_fwd_vec##K##_bf16(                               \
      const bf16* a, const bf16* b, const bf16* gamma, const bf16* beta, bf16* y, int rows, \
      int cols, float eps) {                                                                \
    add_layernorm_fwd_vec<K>(a, b, gamma, beta, y, rows, cols, eps);                        \
  }
INSTANTIATE_VEC(1)
INSTANTIATE_VEC(2)
INSTANTIATE_VEC(3)
INSTANTIATE_VEC(4)

// embed_layernorm: y[r] = LayerNorm(word[ids[r]] + position[positions[r]] + type0), tables
// [*, cols], ids and positions u32 [rows] (validated on the host), y [rows, cols].
template <typename T>
__device__ void embed_layernorm_fwd(const T* __restrict__ word, const T* __restrict__ position,
                                    const T* __restrict__ type0, const uint32_t* __restrict__ ids,
                                    const uint32_t* __restrict__ positions,
                                    const T* __restrict__ gamma, const T* __restrict__ beta,
                                    T* __restrict__ y, int rows, int cols, float eps) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const T* w = word + (int64_t)ids[row] * cols;
  const T* p = position + (int64_t)positions[row] * cols;
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) s += to_f(w[c]) + to_f(p[c]) + to_f(type0[c]);
  float m = warp_sum(s) / cols;
  float v = 0.f;
  for (int c = lane; c < cols; c += 32) {
    float d = to_f(w[c]) + to_f(p[c]) + to_f(type0[c]) - m;
    v += d * d;
  }
  float rs = rsqrtf(warp_sum(v) / cols + eps);
  T* yr = y + (int64_t)row * cols;
  for (int c = lane; c < cols; c += 32)
    yr[c] = from_f<T>((to_f(w[c]) + to_f(p[c]) + to_f(type0[c]) - m) * rs * to_f(gamma[c]) +
                      to_f(beta[c]));
}

#define INSTANTIATE_FUSED(SUF, T)                                                            \
  extern "C" __global__ void add_layernorm_fwd_##SUF(const T* a, const T* b, const T* gamma, \
                                                     const T* beta, T* y, int rows, int cols, \
                                                     float eps) {                             \
    add_layernorm_fwd<T>(a, b, gamma, beta, y, rows, cols, eps);                             \
  }                                                                                          \
  extern "C" __global__ void embed_layernorm_fwd_##SUF(                                      \
      const T* word, const T* position, const T* type0, const uint32_t* ids,                 \
      const uint32_t* positions, const T* gamma, const T* beta, T* y, int rows, int cols,    \
      float eps) {                                                                           \
    embed_layernorm_fwd<T>(word, position, type0, ids, positions, gamma, beta, y, rows, cols, \
                           eps);                                                             \
  }
FOR_FLOAT_TYPES(INSTANTIATE_FUSED)

#define INSTANTIATE(SUF, T)                                                              \
  extern "C" __global__ void layernorm_fwd_##SUF(const T* x, const T* gamma, const T* beta, \
                                                 T* y, float* mean, float* rstd, int rows,  \
                                                 int cols, float eps) {                    \
    layernorm_fwd<T>(x, gamma, beta, y, mean, rstd, rows, cols, eps);                     \
  }                                                                                       \
  extern "C" __global__ void layernorm_bwd_dx_##SUF(const T* dy, const T* x, const T* gamma, \
                                                    const float* mean, const float* rstd,  \
                                                    T* dx, int rows, int cols) {           \
    layernorm_bwd_dx<T>(dy, x, gamma, mean, rstd, dx, rows, cols);                        \
  }                                                                                       \
  extern "C" __global__ void layernorm_bwd_params_##SUF(const T* dy, const T* x,           \
                                                        const float* mean, const float* rstd, \
                                                        float* pg, float* pb, int rows,    \
                                                        int cols, int chunk) {             \
    layernorm_bwd_params<T>(dy, x, mean, rstd, pg, pb, rows, cols, chunk);                \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
