// Row-wise softmax cross-entropy against one target column per row, and its backward.
// (The fused distillation loss of SPEC section 5 lives in distill.cu.)
#include "common.cuh"

// Forward: logits [rows, cols], targets u32 [rows] -> loss[r] = lse[r] - logits[r, t[r]],
// lse[r] = log sum_c exp(logits[r, c]) (both f32). Targets are validated on the host.
// Launch: one warp per row, 8 warps (256 threads) per block, grid ceil(rows / 8).
template <typename T>
__device__ void softmax_ce_fwd(const T* __restrict__ logits,
                               const uint32_t* __restrict__ targets, float* __restrict__ loss,
                               float* __restrict__ lse, int rows, int cols) {
  int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const T* lr = logits + (int64_t)row * cols;
  float m = -INFINITY;
  for (int c = lane; c < cols; c += 32) m = fmaxf(m, to_f(lr[c]));
  m = warp_max(m);
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) s += expf(to_f(lr[c]) - m);
  s = warp_sum(s);
  if (lane == 0) {
    float l = m + logf(s);
    lse[row] = l;
    loss[row] = l - to_f(lr[targets[row]]);
  }
}

// Backward: dlogits[r, c] = dloss[r] * (exp(logits[r, c] - lse[r]) - [c == t[r]]).
// Launch: rows*cols elements, 1-D grid-stride, 256 threads per block.
template <typename T>
__device__ void softmax_ce_bwd(const float* __restrict__ dloss, const T* __restrict__ logits,
                               const float* __restrict__ lse,
                               const uint32_t* __restrict__ targets, T* __restrict__ dlogits,
                               int rows, int cols) {
  GRID_STRIDE(i, (int64_t)rows * cols) {
    int64_t r = i / cols, c = i % cols;
    float p = expf(to_f(logits[i]) - lse[r]);
    float hot = (c == (int64_t)targets[r]) ? 1.f : 0.f;
    dlogits[i] = from_f<T>(dloss[r] * (p - hot));
  }
}

#define INSTANTIATE(SUF, T)                                                               \
  extern "C" __global__ void softmax_ce_fwd_##SUF(const T* logits, const uint32_t* targets, \
                                                  float* loss, float* lse, int rows,       \
                                                  int cols) {                              \
    softmax_ce_fwd<T>(logits, targets, loss, lse, rows, cols);                             \
  }                                                                                        \
  extern "C" __global__ void softmax_ce_bwd_##SUF(const float* dloss, const T* logits,     \
                                                  const float* lse, const uint32_t* targets, \
                                                  T* dlogits, int rows, int cols) {        \
    softmax_ce_bwd<T>(dloss, logits, lse, targets, dlogits, rows, cols);                   \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
