// Shared device helpers: bf16 <-> f32 conversion for templated kernels, warp and block
// reductions. Every kernel stores T = float or __nv_bfloat16 and computes in f32.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "geometry.cuh"

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Grid-stride loop over n elements with 64-bit indices (tables of 250k x 1024 exceed int).
#define GRID_STRIDE(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); \
       i += (int64_t)gridDim.x * blockDim.x)

// Instantiates a templated kernel body `NAME##_impl<T>` as extern "C" NAME_f32 / NAME_bf16.
#define FOR_FLOAT_TYPES(MACRO) MACRO(f32, float) MACRO(bf16, bf16)

// Pointwise maps over 16-byte vectors (8 bf16 or 4 f32 per load and store), for memory-bound
// elementwise kernels: y[i] = f(x[i]) (map1) or f(a[i], b[i]) (map2), math in f32. Where a
// pointer is not 16-byte aligned everything goes through the scalar tail loop. Launch: any
// 1-D grid (grid-stride over vectors, then over the tail); the host sizes it for n / 8
// threads.
template <typename T, typename F>
__device__ __forceinline__ void map1_vec16(const T* __restrict__ x, T* __restrict__ y,
                                           int64_t n, F f) {
  constexpr int N = 16 / sizeof(T);
  bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15) == 0;
  int64_t nv = aligned ? n / N : 0;
  int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = first; i < nv; i += stride) {
    uint4 in = reinterpret_cast<const uint4*>(x)[i], out;
    const T* e = reinterpret_cast<const T*>(&in);
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = from_f<T>(f(to_f(e[k])));
    reinterpret_cast<uint4*>(y)[i] = out;
  }
  for (int64_t i = nv * N + first; i < n; i += stride) y[i] = from_f<T>(f(to_f(x[i])));
}

template <typename T, typename F>
__device__ __forceinline__ void map2_vec16(const T* __restrict__ a, const T* __restrict__ b,
                                           T* __restrict__ y, int64_t n, F f) {
  constexpr int N = 16 / sizeof(T);
  bool aligned = ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                   reinterpret_cast<uintptr_t>(y)) & 15) == 0;
  int64_t nv = aligned ? n / N : 0;
  int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = first; i < nv; i += stride) {
    uint4 ia = reinterpret_cast<const uint4*>(a)[i], ib = reinterpret_cast<const uint4*>(b)[i];
    uint4 out;
    const T* ea = reinterpret_cast<const T*>(&ia);
    const T* eb = reinterpret_cast<const T*>(&ib);
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = from_f<T>(f(to_f(ea[k]), to_f(eb[k])));
    reinterpret_cast<uint4*>(y)[i] = out;
  }
  for (int64_t i = nv * N + first; i < n; i += stride)
    y[i] = from_f<T>(f(to_f(a[i]), to_f(b[i])));
}
