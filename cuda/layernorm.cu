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
  int row = blockIdx.x * 8 + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
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
  int row = blockIdx.x * 8 + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * cols;
  const T* dr = dy + (int64_t)row * cols;
  float m = mean[row], rs = rstd[row];
  float a = 0.f, b = 0.f;
  for (int c = lane; c < cols; c += 32) {
    float gd = to_f(gamma[c]) * to_f(dr[c]);
    a += gd;
    b += gd * (to_f(xr[c]) - m) * rs;
  }
  a = warp_sum(a) / cols;
  b = warp_sum(b) / cols;
  T* out = dx + (int64_t)row * cols;
  for (int c = lane; c < cols; c += 32) {
    float xhat = (to_f(xr[c]) - m) * rs;
    out[c] = from_f<T>(rs * (to_f(gamma[c]) * to_f(dr[c]) - a - xhat * b));
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
  int c = blockIdx.x * 256 + threadIdx.x;
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
