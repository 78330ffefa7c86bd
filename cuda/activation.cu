// Pointwise activations and their backward passes: exact (erf) GELU and ReLU.
// All kernels: n elements, 1-D grid-stride, 256 threads per block, f32 math; GELU and ReLU
// move 16-byte vectors (map1_vec16 / map2_vec16: the scalar version of GELU forward ran at
// 640 GB/s on an H100, a fifth of its bandwidth). Each templated body is instantiated as
// extern "C" NAME_f32 and NAME_bf16.
#include "common.cuh"

__device__ __forceinline__ float gelu_cdf(float v) {
  return 0.5f * (1.f + erff(v * 0.70710678118654752f));
}

// gelu forward: y = x * Phi(x), Phi through erff (the exact GELU BERT/XLM-R use).
template <typename T>
__device__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  map1_vec16(x, y, n, [](float v) { return v * gelu_cdf(v); });
}

// gelu backward: dx = dy * (Phi(x) + x * phi(x)).
template <typename T>
__device__ void gelu_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                         T* __restrict__ dx, int64_t n) {
  map2_vec16(dy, x, dx, n, [](float d, float v) {
    float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    return d * (gelu_cdf(v) + v * pdf);
  });
}

template <typename T>
__device__ void relu_fwd(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  map1_vec16(x, y, n, [](float v) { return fmaxf(v, 0.f); });
}

// relu backward: dx = dy where x > 0, else 0.
template <typename T>
__device__ void relu_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                         T* __restrict__ dx, int64_t n) {
  map2_vec16(dy, x, dx, n, [](float d, float v) { return v > 0.f ? d : 0.f; });
}

// dropout: y[i] = x[i] * keep(seed, i), keep = 0 with probability p else 1/(1-p), from
// SplitMix64 of seed + (i+1)*phi (top 24 bits as a uniform), bit-identical to the CPU's
// dropout_keep. n elements; 1-D grid-stride, 256 threads per block.
__device__ __forceinline__ float dropout_keep(unsigned long long seed, unsigned long long i,
                                              float p) {
  unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  float u = (float)(unsigned int)(z >> 40) / 16777216.f;
  return u < p ? 0.f : 1.f / (1.f - p);
}

template <typename T>
__device__ void dropout(const T* __restrict__ x, T* __restrict__ y, float p,
                        unsigned long long seed, int64_t n) {
  GRID_STRIDE(i, n) y[i] = from_f<T>(to_f(x[i]) * dropout_keep(seed, (unsigned long long)i, p));
}

#define INSTANTIATE(SUF, T)                                                           \
  extern "C" __global__ void gelu_fwd_##SUF(const T* x, T* y, int64_t n) {             \
    gelu_fwd<T>(x, y, n);                                                              \
  }                                                                                    \
  extern "C" __global__ void gelu_bwd_##SUF(const T* dy, const T* x, T* dx, int64_t n) { \
    gelu_bwd<T>(dy, x, dx, n);                                                         \
  }                                                                                    \
  extern "C" __global__ void dropout_##SUF(const T* x, T* y, float p,                   \
                                           unsigned long long seed, int64_t n) {       \
    dropout<T>(x, y, p, seed, n);                                                      \
  }                                                                                    \
  extern "C" __global__ void relu_fwd_##SUF(const T* x, T* y, int64_t n) {             \
    relu_fwd<T>(x, y, n);                                                              \
  }                                                                                    \
  extern "C" __global__ void relu_bwd_##SUF(const T* dy, const T* x, T* dx, int64_t n) { \
    relu_bwd<T>(dy, x, dx, n);                                                         \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
