// Pointwise activations and their backward passes: exact (erf) GELU and ReLU.
// All kernels: n elements, 1-D grid-stride, 256 threads per block, f32 math; each
// templated body is instantiated as extern "C" NAME_f32 and NAME_bf16.
#include "common.cuh"

__device__ __forceinline__ float gelu_cdf(float v) {
  return 0.5f * (1.f + erff(v * 0.70710678118654752f));
}

// gelu forward: y = x * Phi(x), Phi through erff (the exact GELU BERT/XLM-R use).
template <typename T>
__device__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  GRID_STRIDE(i, n) {
    float v = to_f(x[i]);
    y[i] = from_f<T>(v * gelu_cdf(v));
  }
}

// gelu backward: dx = dy * (Phi(x) + x * phi(x)).
template <typename T>
__device__ void gelu_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                         T* __restrict__ dx, int64_t n) {
  GRID_STRIDE(i, n) {
    float v = to_f(x[i]);
    float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    dx[i] = from_f<T>(to_f(dy[i]) * (gelu_cdf(v) + v * pdf));
  }
}

template <typename T>
__device__ void relu_fwd(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  GRID_STRIDE(i, n) y[i] = from_f<T>(fmaxf(to_f(x[i]), 0.f));
}

// relu backward: dx = dy where x > 0, else 0.
template <typename T>
__device__ void relu_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                         T* __restrict__ dx, int64_t n) {
  GRID_STRIDE(i, n) dx[i] = to_f(x[i]) > 0.f ? dy[i] : from_f<T>(0.f);
}

#define INSTANTIATE(SUF, T)                                                           \
  extern "C" __global__ void gelu_fwd_##SUF(const T* x, T* y, int64_t n) {             \
    gelu_fwd<T>(x, y, n);                                                              \
  }                                                                                    \
  extern "C" __global__ void gelu_bwd_##SUF(const T* dy, const T* x, T* dx, int64_t n) { \
    gelu_bwd<T>(dy, x, dx, n);                                                         \
  }                                                                                    \
  extern "C" __global__ void relu_fwd_##SUF(const T* x, T* y, int64_t n) {             \
    relu_fwd<T>(x, y, n);                                                              \
  }                                                                                    \
  extern "C" __global__ void relu_bwd_##SUF(const T* dy, const T* x, T* dx, int64_t n) { \
    relu_bwd<T>(dy, x, dx, n);                                                         \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
