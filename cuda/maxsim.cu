// Late-interaction (colbert) max-sim scores between packed queries and packed passages, and
// their backward through the saved arg-max. Every reduction runs in a fixed order (no
// atomics), so results are bit-reproducible run to run, which resumable training needs.
#include "common.cuh"

#define NO_ROW 0xffffffffu

// Best match of each query row in each passage.
// q [Tq, d], p [Tp, d] (T = f32 or bf16), p_cu u32 [Bp + 1] ->
//   best f32 [Tq, Bp] = max_{j in passage n} <q_i, p_j> (0 for an empty passage),
//   arg  u32 [Tq, Bp] = the first j reaching it (NO_ROW for an empty passage).
// Launch: grid (Bp, ceil(Tq / 8)), 256 threads = 8 warps; warp w takes query row
// blockIdx.y * 8 + w against passage blockIdx.x, lanes split the d columns.
template <typename T>
__device__ void maxsim_rows(const T* __restrict__ q, const T* __restrict__ p,
                            const uint32_t* __restrict__ p_cu, float* __restrict__ best,
                            uint32_t* __restrict__ arg, int tq, int bp, int d) {
  int n = blockIdx.x;
  int i = blockIdx.y * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (i >= tq) return;
  uint32_t j0 = p_cu[n], j1 = p_cu[n + 1];
  const T* qi = q + (int64_t)i * d;
  float m = -INFINITY;
  uint32_t a = NO_ROW;
  for (uint32_t j = j0; j < j1; ++j) {
    const T* pj = p + (int64_t)j * d;
    float s = 0.f;
    for (int c = lane; c < d; c += 32) s += to_f(qi[c]) * to_f(pj[c]);
    s = warp_sum(s);
    if (s > m) {
      m = s;
      a = j;
    }
  }
  if (lane == 0) {
    best[(int64_t)i * bp + n] = (j1 > j0) ? m : 0.f;
    arg[(int64_t)i * bp + n] = a;
  }
}

// Best match per (query row, passage) from a score block computed by a GEMM (the fast path:
// cuBLASLt forms S = Q P^T for a chunk of passages, this reduces it). s f32 [Tq, cols] holds
// the scores against passage rows j0 .. j0 + cols; passages n0 .. n0 + grid.x lie inside it.
// Writes best / arg exactly as maxsim_rows does (first j on ties, 0 / NO_ROW when empty).
// Launch: grid (passages in the chunk, ceil(Tq / 8)), 256 threads; warp w takes query row
// blockIdx.y * 8 + w, lanes stride over the passage's columns (coalesced along the row).
extern "C" __global__ void maxsim_segmax(const float* __restrict__ s,
                                         const uint32_t* __restrict__ p_cu,
                                         float* __restrict__ best, uint32_t* __restrict__ arg,
                                         int tq, int bp, int n0, int j0, int cols) {
  const int n = n0 + blockIdx.x;
  const int i = blockIdx.y * ROWS_PER_BLOCK + threadIdx.x / WARP, lane = threadIdx.x % WARP;
  if (i >= tq) return;
  const uint32_t c0 = p_cu[n] - (uint32_t)j0, c1 = p_cu[n + 1] - (uint32_t)j0;
  const float* row = s + (int64_t)i * cols;
  float m = -INFINITY;
  uint32_t a = NO_ROW;
  for (uint32_t c = c0 + lane; c < c1; c += 32) {
    const float v = row[c];
    if (v > m) {
      m = v;
      a = c + (uint32_t)j0;
    }
  }
  // Warp arg-max; equal values keep the smaller row, as the sequential scan would.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, off);
    const uint32_t oa = __shfl_xor_sync(0xffffffffu, a, off);
    if (om > m || (om == m && oa < a)) {
      m = om;
      a = oa;
    }
  }
  if (lane == 0) {
    best[(int64_t)i * bp + n] = c1 > c0 ? m : 0.f;
    arg[(int64_t)i * bp + n] = c1 > c0 ? a : NO_ROW;
  }
}

// Scores: s f32 [Bq, Bp], s[b, n] = (1 / L_b) * sum_{i in query b} best[i, n] (0 for an empty
// query), summed in row order. Launch: 1-D grid-stride over Bq * Bp, 256 threads per block.
extern "C" __global__ void maxsim_reduce(const float* __restrict__ best,
                                         const uint32_t* __restrict__ q_cu,
                                         float* __restrict__ s, int bq, int bp) {
  GRID_STRIDE(k, (int64_t)bq * bp) {
    int64_t b = k / bp, n = k % bp;
    uint32_t i0 = q_cu[b], i1 = q_cu[b + 1];
    float acc = 0.f;
    for (uint32_t i = i0; i < i1; ++i) acc += best[(int64_t)i * bp + n];
    s[k] = (i1 > i0) ? acc / (float)(i1 - i0) : 0.f;
  }
}

// dq [Tq, d]: dq[i, c] = sum_n ds[b(i), n] / L_b * p[arg[i, n], c], over n in order.
// q_seq u32 [Tq] gives b(i). Launch: 1-D grid-stride over Tq * d, 256 threads per block.
template <typename T>
__device__ void maxsim_bwd_q(const float* __restrict__ ds, const T* __restrict__ p,
                             const uint32_t* __restrict__ arg, const uint32_t* __restrict__ q_cu,
                             const uint32_t* __restrict__ q_seq, T* __restrict__ dq, int tq,
                             int bp, int d) {
  GRID_STRIDE(k, (int64_t)tq * d) {
    int64_t i = k / d, c = k % d;
    uint32_t b = q_seq[i];
    float inv = 1.f / (float)(q_cu[b + 1] - q_cu[b]);
    float acc = 0.f;
    for (int n = 0; n < bp; ++n) {
      uint32_t j = arg[i * bp + n];
      if (j != NO_ROW) acc += ds[(int64_t)b * bp + n] * inv * to_f(p[(int64_t)j * d + c]);
    }
    dq[k] = from_f<T>(acc);
  }
}

// dp [Tp, d]: dp[j, c] = sum over query rows i with arg[i, n(j)] == j of
// ds[b(i), n(j)] / L_b * q[i, c], in ascending i (a gather, not atomics: deterministic).
// p_seq u32 [Tp] gives n(j). Launch: one block of 256 threads per passage row j; every warp
// scans the query rows 32 at a time with a ballot (same mask in every warp, so no shared
// memory), then each thread adds the matches for its columns c = tid, tid + 256, ...
template <typename T>
__device__ void maxsim_bwd_p(const float* __restrict__ ds, const T* __restrict__ q,
                             const uint32_t* __restrict__ arg, const uint32_t* __restrict__ q_cu,
                             const uint32_t* __restrict__ q_seq, const uint32_t* __restrict__ p_seq,
                             T* __restrict__ dp, int tq, int bp, int d) {
  uint32_t j = blockIdx.x;
  uint32_t n = p_seq[j];
  int lane = threadIdx.x % WARP;
  // Up to 4 columns per thread in registers (d <= 1024); wider rows take a second pass.
  for (int c0 = 0; c0 < d; c0 += 4 * COL_BLOCK_THREADS) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int base = 0; base < tq; base += 32) {
      int i = base + lane;
      bool hit = i < tq && arg[(int64_t)i * bp + n] == j;
      uint32_t mask = __ballot_sync(0xffffffffu, hit);
      while (mask) {
        int l = __ffs(mask) - 1;
        mask &= mask - 1;
        int ii = base + l;
        uint32_t b = q_seq[ii];
        float coef = ds[(int64_t)b * bp + n] / (float)(q_cu[b + 1] - q_cu[b]);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          int c = c0 + u * COL_BLOCK_THREADS + threadIdx.x;
          if (c < d) acc[u] += coef * to_f(q[(int64_t)ii * d + c]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      int c = c0 + u * COL_BLOCK_THREADS + threadIdx.x;
      if (c < d) dp[(int64_t)j * d + c] = from_f<T>(acc[u]);
    }
  }
}

#define INSTANTIATE(SUF, T)                                                                   \
  extern "C" __global__ void maxsim_rows_##SUF(const T* q, const T* p, const uint32_t* p_cu,  \
                                               float* best, uint32_t* arg, int tq, int bp,    \
                                               int d) {                                       \
    maxsim_rows<T>(q, p, p_cu, best, arg, tq, bp, d);                                         \
  }                                                                                           \
  extern "C" __global__ void maxsim_bwd_q_##SUF(const float* ds, const T* p,                  \
                                                const uint32_t* arg, const uint32_t* q_cu,    \
                                                const uint32_t* q_seq, T* dq, int tq, int bp, \
                                                int d) {                                      \
    maxsim_bwd_q<T>(ds, p, arg, q_cu, q_seq, dq, tq, bp, d);                                  \
  }                                                                                           \
  extern "C" __global__ void maxsim_bwd_p_##SUF(                                              \
      const float* ds, const T* q, const uint32_t* arg, const uint32_t* q_cu,                 \
      const uint32_t* q_seq, const uint32_t* p_seq, T* dp, int tq, int bp, int d) {           \
    maxsim_bwd_p<T>(ds, q, arg, q_cu, q_seq, p_seq, dp, tq, bp, d);                           \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
