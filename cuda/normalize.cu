// Row-wise L2 normalisation y = x / max(||x||, eps) (torch's F.normalize) and its backward.
#include "common.cuh"

// Forward: x [rows, cols] -> y [rows, cols], norms f32 [rows].
// Launch: one warp per row, 8 warps (256 threads) per block, grid ceil(rows / 8).
template <typename T>
__device__ void l2norm_fwd(const T* __restrict__ x, T* __restrict__ y,
                           float* __restrict__ norms, int rows, int cols, float eps) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * cols;
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) {
    float v = to_f(xr[c]);
    s += v * v;
  }
  float n = sqrtf(warp_sum(s));
  float inv = 1.f / fmaxf(n, eps);
  T* yr = y + (int64_t)row * cols;
  for (int c = lane; c < cols; c += 32) yr[c] = from_f<T>(to_f(xr[c]) * inv);
  if (lane == 0) norms[row] = n;
}

// Backward: dx = (dy - y * <dy, y>) / ||x|| when ||x|| > eps, else dy / eps (the clamped
// denominator is constant). Launch: one warp per row, 8 warps per block.
template <typename T>
__device__ void l2norm_bwd(const T* __restrict__ dy, const T* __restrict__ y,
                           const float* __restrict__ norms, T* __restrict__ dx, int rows,
                           int cols, float eps) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const T* dr = dy + (int64_t)row * cols;
  const T* yr = y + (int64_t)row * cols;
  T* out = dx + (int64_t)row * cols;
  float n = norms[row];
  if (n > eps) {
    float dot = 0.f;
    for (int c = lane; c < cols; c += 32) dot += to_f(dr[c]) * to_f(yr[c]);
    dot = warp_sum(dot);
    for (int c = lane; c < cols; c += 32)
      out[c] = from_f<T>((to_f(dr[c]) - to_f(yr[c]) * dot) / n);
  } else {
    for (int c = lane; c < cols; c += 32) out[c] = from_f<T>(to_f(dr[c]) / eps);
  }
}

#define INSTANTIATE(SUF, T)                                                              \
  extern "C" __global__ void l2norm_fwd_##SUF(const T* x, T* y, float* norms, int rows,    \
                                              int cols, float eps) {                      \
    l2norm_fwd<T>(x, y, norms, rows, cols, eps);                                          \
  }                                                                                       \
  extern "C" __global__ void l2norm_bwd_##SUF(const T* dy, const T* y, const float* norms, \
                                              T* dx, int rows, int cols, float eps) {      \
    l2norm_bwd<T>(dy, y, norms, dx, rows, cols, eps);                                     \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
