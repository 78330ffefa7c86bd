// Cross-entropy against soft targets (the self-distillation and teacher terms of SPEC
// section 5): loss[r] = -sum_c t[r, c] * log_softmax(x)[r, c], and its backward. Targets
// need not sum to 1 (m3_kd_loss weights one column by a teacher probability).
// (A fused per-row kernel for all four score matrices is issue 6's; this is the reference.)
#include "common.cuh"

// Forward: logits x [rows, cols] (f32 or bf16), targets t f32 [rows, cols] ->
// loss f32 [rows], lse f32 [rows]. Launch: one warp per row, 8 warps per block.
template <typename T>
__device__ void soft_ce_fwd(const T* __restrict__ x, const float* __restrict__ t,
                            float* __restrict__ loss, float* __restrict__ lse, int rows,
                            int cols) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * cols;
  const float* tr = t + (int64_t)row * cols;
  float m = -INFINITY;
  for (int c = lane; c < cols; c += 32) m = fmaxf(m, to_f(xr[c]));
  m = warp_max(m);
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) s += expf(to_f(xr[c]) - m);
  s = warp_sum(s);
  float l = m + logf(s);
  // Zero targets contribute nothing, even where a masked logit makes (l - x) huge.
  float acc = 0.f;
  for (int c = lane; c < cols; c += 32)
    if (tr[c] != 0.f) acc += tr[c] * (l - to_f(xr[c]));
  acc = warp_sum(acc);
  if (lane == 0) {
    lse[row] = l;
    loss[row] = acc;
  }
}

// Backward: dx[r, c] = dloss[r] * (exp(x[r, c] - lse[r]) * sum_c t[r, c] - t[r, c]).
// Launch: one warp per row, 8 warps per block.
template <typename T>
__device__ void soft_ce_bwd(const float* __restrict__ dloss, const T* __restrict__ x,
                            const float* __restrict__ lse, const float* __restrict__ t,
                            T* __restrict__ dx, int rows, int cols) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const float* tr = t + (int64_t)row * cols;
  float total = 0.f;
  for (int c = lane; c < cols; c += 32) total += tr[c];
  total = warp_sum(total);
  float g = dloss[row], l = lse[row];
  for (int c = lane; c < cols; c += 32) {
    int64_t k = (int64_t)row * cols + c;
    dx[k] = from_f<T>(g * (expf(to_f(x[k]) - l) * total - tr[c]));
  }
}

#define INSTANTIATE(SUF, T)                                                                  \
  extern "C" __global__ void soft_ce_fwd_##SUF(const T* x, const float* t, float* loss,      \
                                               float* lse, int rows, int cols) {             \
    soft_ce_fwd<T>(x, t, loss, lse, rows, cols);                                             \
  }                                                                                          \
  extern "C" __global__ void soft_ce_bwd_##SUF(const float* dloss, const T* x,               \
                                               const float* lse, const float* t, T* dx,      \
                                               int rows, int cols) {                         \
    soft_ce_bwd<T>(dloss, x, lse, t, dx, rows, cols);                                        \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
