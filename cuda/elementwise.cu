// Elementwise and reduction helpers: add, dtype casts, column sums.
// Each templated body is instantiated as extern "C" NAME_f32 and NAME_bf16.
#include "common.cuh"

// add: y[i] = a[i] + b[i]. n elements; 1-D grid-stride over 16-byte vectors, 256 threads
// per block.
template <typename T>
__device__ void add(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                    int64_t n) {
  map2_vec16(a, b, y, n, [](float u, float v) { return u + v; });
}

// sum_rows: out[c] = sum_r x[r, c] in f32, x [rows, cols].
// Launch: grid (ceil(cols/32)), block (32, 8). threadIdx.x picks the column (coalesced
// across the warp), threadIdx.y strides over rows; the 8 partials meet in shared memory.
template <typename T>
__device__ void sum_rows(const T* __restrict__ x, float* __restrict__ out, int rows,
                         int cols) {
  __shared__ float part[SUM_ROWS_STRIDES][SUM_ROWS_COLS + 1];
  int c = blockIdx.x * SUM_ROWS_COLS + threadIdx.x;
  float acc = 0.f;
  if (c < cols)
    for (int r = threadIdx.y; r < rows; r += SUM_ROWS_STRIDES)
      acc += to_f(x[(int64_t)r * cols + c]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float s = 0.f;
    for (int k = 0; k < SUM_ROWS_STRIDES; ++k) s += part[k][threadIdx.x];
    out[c] = s;
  }
}

// scale: y[i] = c * x[i]. n elements; 1-D grid-stride, 256 threads per block.
template <typename T>
__device__ void scale(const T* __restrict__ x, T* __restrict__ y, float c, int64_t n) {
  GRID_STRIDE(i, n) y[i] = from_f<T>(c * to_f(x[i]));
}

// fill: y[i] = v. n elements; 1-D grid-stride, 256 threads per block.
template <typename T>
__device__ void fill(T* __restrict__ y, float v, int64_t n) {
  GRID_STRIDE(i, n) y[i] = from_f<T>(v);
}

#define INSTANTIATE(SUF, T)                                                           \
  extern "C" __global__ void add_##SUF(const T* a, const T* b, T* y, int64_t n) {      \
    add<T>(a, b, y, n);                                                                \
  }                                                                                    \
  extern "C" __global__ void scale_##SUF(const T* x, T* y, float c, int64_t n) {       \
    scale<T>(x, y, c, n);                                                              \
  }                                                                                    \
  extern "C" __global__ void fill_##SUF(T* y, float v, int64_t n) { fill<T>(y, v, n); } \
  extern "C" __global__ void sum_rows_##SUF(const T* x, float* out, int rows, int cols) { \
    sum_rows<T>(x, out, rows, cols);                                                   \
  }
FOR_FLOAT_TYPES(INSTANTIATE)

// cast: y[i] = x[i] converted (round-to-nearest-even into bf16). n elements; 1-D
// grid-stride, 256 threads per block.
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y,
                                         int64_t n) {
  GRID_STRIDE(i, n) y[i] = __float2bfloat16_rn(x[i]);
}
extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y,
                                         int64_t n) {
  GRID_STRIDE(i, n) y[i] = __bfloat162float(x[i]);
}

// AdamW in place on f32 p, m, v [n] with gradient g [n] (f32 or bf16), the arithmetic of
// backend::adamw_host: p *= 1 - decay; m, v from g * grad_scale; p -= step_size * m /
// (sqrt(v) / bc2_sqrt + eps). Launch: 1-D grid-stride over n, 256 threads per block.
template <typename T>
__device__ void adamw(float* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                      float* __restrict__ v, int64_t n, float grad_scale, float beta1,
                      float beta2, float eps, float step_size, float bc2_sqrt, float decay) {
  GRID_STRIDE(i, n) {
    float gi = to_f(g[i]);
    if (grad_scale != 1.f) gi = gi * grad_scale;
    float pi = p[i] * (1.f - decay);
    float mi = beta1 * m[i] + (1.f - beta1) * gi;
    float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi - step_size * mi / denom;
    m[i] = mi;
    v[i] = vi;
  }
}

// accumulate: dst[i] += src[i], dst f32, src f32 or bf16 [n] (a parameter's gradient into
// its slot of the gradient arena; dst is an offset into the arena, so no alignment beyond
// the element's is assumed and no pointer is declared __restrict__ against another).
// Launch: 1-D grid-stride over n, 256 threads per block.
template <typename T>
__device__ void accumulate(float* dst, const T* src, int64_t n) {
  GRID_STRIDE(i, n) dst[i] += to_f(src[i]);
}

// Tree sum of one f64 value per thread over a REDUCE_THREADS block; every thread gets the
// total. Once per kernel: there is no barrier before the first write to the shared array.
__device__ double block_sum(double s) {
  __shared__ double acc[REDUCE_THREADS];
  acc[threadIdx.x] = s;
  __syncthreads();
  for (int w = REDUCE_THREADS / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
    __syncthreads();
  }
  return acc[0];
}

// Partial sums of squares in f64: block b writes partial[b] (the host adds them in order,
// so the result does not depend on scheduling). Launch: exactly 256 blocks of 256 threads,
// grid-stride over n.
template <typename T>
__device__ void sum_squares_partial(const T* __restrict__ x, double* __restrict__ partial,
                                    int64_t n) {
  double s = 0.0;
  GRID_STRIDE(i, n) {
    double e = (double)to_f(x[i]);
    s += e * e;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Sum of all n elements into out[0], accumulated in f64 like the CPU reference: an f32
// running sum loses digits to cancellation (loss terms of mixed sign). Launch: one block
// of 256 threads; the operands are loss-sized, so one block is enough.
template <typename T>
__device__ void sum_all(const T* __restrict__ x, float* __restrict__ out, int64_t n) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += REDUCE_THREADS) s += (double)to_f(x[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = (float)s;
}

#define INSTANTIATE_OPT(SUF, T)                                                             \
  extern "C" __global__ void adamw_##SUF(float* p, const T* g, float* m, float* v, int64_t n, \
                                         float grad_scale, float beta1, float beta2,          \
                                         float eps, float step_size, float bc2_sqrt,          \
                                         float decay) {                                       \
    adamw<T>(p, g, m, v, n, grad_scale, beta1, beta2, eps, step_size, bc2_sqrt, decay);       \
  }                                                                                           \
  extern "C" __global__ void accumulate_##SUF(float* dst, const T* src, int64_t n) {        \
    accumulate<T>(dst, src, n);                                                               \
  }                                                                                           \
  extern "C" __global__ void sum_squares_##SUF(const T* x, double* partial, int64_t n) {     \
    sum_squares_partial<T>(x, partial, n);                                                    \
  }                                                                                           \
  extern "C" __global__ void sum_all_##SUF(const T* x, float* out, int64_t n) {              \
    sum_all<T>(x, out, n);                                                                    \
  }
FOR_FLOAT_TYPES(INSTANTIATE_OPT)
