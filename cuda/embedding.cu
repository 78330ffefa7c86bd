// Embedding row gather and its backward scatter-add.
#include "common.cuh"

// Gather: out[r, d] = table[ids[r], d]; table [vocab, dim], ids u32 [n], out [n, dim].
// Launch: n*dim elements, 1-D grid-stride, 256 threads per block. Ids are validated on
// the host before launch.
template <typename T>
__device__ void embedding_fwd(const T* __restrict__ table, const uint32_t* __restrict__ ids,
                              T* __restrict__ out, int n, int dim) {
  GRID_STRIDE(i, (int64_t)n * dim) {
    int64_t r = i / dim, d = i % dim;
    out[i] = table[(int64_t)ids[r] * dim + d];
  }
}

// Scatter-add: dtable[ids[r], d] += dy[r, d] into a zeroed f32 [vocab, dim] table.
// Launch: n*dim elements, 1-D grid-stride, 256 threads per block. f32 atomics: repeated
// ids sum in an unspecified order (differences at rounding level only).
template <typename T>
__device__ void embedding_bwd(const T* __restrict__ dy, const uint32_t* __restrict__ ids,
                              float* __restrict__ dtable, int n, int dim) {
  GRID_STRIDE(i, (int64_t)n * dim) {
    int64_t r = i / dim, d = i % dim;
    atomicAdd(dtable + (int64_t)ids[r] * dim + d, to_f(dy[i]));
  }
}

#define INSTANTIATE(SUF, T)                                                             \
  extern "C" __global__ void embedding_fwd_##SUF(const T* table, const uint32_t* ids,    \
                                                 T* out, int n, int dim) {              \
    embedding_fwd<T>(table, ids, out, n, dim);                                           \
  }                                                                                      \
  extern "C" __global__ void embedding_bwd_##SUF(const T* dy, const uint32_t* ids,       \
                                                 float* dtable, int n, int dim) {       \
    embedding_bwd<T>(dy, ids, dtable, n, dim);                                           \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
