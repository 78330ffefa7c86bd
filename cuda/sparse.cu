// Lexical (sparse) matching scores from per-token weights, scatter-max by token id per
// sequence with no vocabulary-sized buffer (SPEC section 5), and the backward routed to each
// id's arg-max occurrence. The host groups each sequence's non-special rows by token id
// ("entries", sorted by id, rows ascending within an entry); everything here is O(tokens).
// Fixed-order reductions only (no atomics): bit-reproducible.
#include "common.cuh"

// Per entry k: wmax[k] = max of w over its rows, warg[k] = the first row reaching it.
// w [T] (f32 or bf16), rows u32 [R] grouped by entry, start u32 [U + 1].
// Launch: 1-D grid-stride over U, 256 threads per block.
template <typename T>
__device__ void lexical_reduce(const T* __restrict__ w, const uint32_t* __restrict__ rows,
                               const uint32_t* __restrict__ start, float* __restrict__ wmax,
                               uint32_t* __restrict__ warg, int u) {
  GRID_STRIDE(k, u) {
    float m = -INFINITY;
    uint32_t a = 0;
    for (uint32_t r = start[k]; r < start[k + 1]; ++r) {
      float v = to_f(w[rows[r]]);
      if (v > m) {
        m = v;
        a = rows[r];
      }
    }
    wmax[k] = m;
    warg[k] = a;
  }
}

// The entry of sequence `seg` ([lo, hi) of the entries) holding token id `id`, or -1.
__device__ __forceinline__ int find_id(const uint32_t* __restrict__ ids, uint32_t lo, uint32_t hi,
                                       uint32_t id) {
  while (lo < hi) {
    uint32_t mid = (lo + hi) / 2;
    uint32_t v = ids[mid];
    if (v == id) return (int)mid;
    if (v < id) lo = mid + 1; else hi = mid;
  }
  return -1;
}

// Scores s f32 [Bq, Bp]: s[b, n] = sum over ids shared by query b and passage n of
// wmax_q * wmax_p. q_ids/p_ids u32 [U] (entry ids), q_seg u32 [Bq + 1] / p_seg [Bp + 1]
// (entries of each sequence). Launch: grid (Bp, ceil(Bq / 8)), 256 threads; warp w takes
// query blockIdx.y * 8 + w against passage blockIdx.x, lanes stride the query's entries and
// binary-search the passage's.
extern "C" __global__ void lexical_scores(const uint32_t* __restrict__ q_ids,
                                          const float* __restrict__ q_w,
                                          const uint32_t* __restrict__ q_seg,
                                          const uint32_t* __restrict__ p_ids,
                                          const float* __restrict__ p_w,
                                          const uint32_t* __restrict__ p_seg,
                                          float* __restrict__ s, int bq, int bp) {
  int n = blockIdx.x;
  int b = blockIdx.y * ROWS_PER_BLOCK + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (b >= bq) return;
  float acc = 0.f;
  for (uint32_t k = q_seg[b] + lane; k < q_seg[b + 1]; k += 32) {
    int o = find_id(p_ids, p_seg[n], p_seg[n + 1], q_ids[k]);
    if (o >= 0) acc += q_w[k] * p_w[o];
  }
  acc = warp_sum(acc);
  if (lane == 0) s[(int64_t)b * bp + n] = acc;
}

// Backward for one side ("self"; the other side is "other"): for each self entry k of
// sequence a = seq[k], dw[warg[k]] = sum over other sequences m (in order) of
// ds[a * stride_self + m * stride_other] * (other's weight for the same id). dw [T] in the
// weights' dtype must be zeroed first (rows that hold no arg-max get 0).
// Launch: 1-D grid-stride over U_self, 256 threads per block.
template <typename T>
__device__ void lexical_bwd(const float* __restrict__ ds, const uint32_t* __restrict__ ids,
                            const uint32_t* __restrict__ seq, const uint32_t* __restrict__ warg,
                            const uint32_t* __restrict__ o_ids, const float* __restrict__ o_w,
                            const uint32_t* __restrict__ o_seg, T* __restrict__ dw, int u,
                            int bo, int stride_self, int stride_other) {
  GRID_STRIDE(k, u) {
    uint32_t a = seq[k];
    float acc = 0.f;
    for (int m = 0; m < bo; ++m) {
      int o = find_id(o_ids, o_seg[m], o_seg[m + 1], ids[k]);
      if (o >= 0) acc += ds[(int64_t)a * stride_self + (int64_t)m * stride_other] * o_w[o];
    }
    dw[warg[k]] = from_f<T>(acc);
  }
}

#define INSTANTIATE(SUF, T)                                                                   \
  extern "C" __global__ void lexical_reduce_##SUF(const T* w, const uint32_t* rows,           \
                                                  const uint32_t* start, float* wmax,         \
                                                  uint32_t* warg, int u) {                    \
    lexical_reduce<T>(w, rows, start, wmax, warg, u);                                         \
  }                                                                                           \
  extern "C" __global__ void lexical_bwd_##SUF(                                               \
      const float* ds, const uint32_t* ids, const uint32_t* seq, const uint32_t* warg,        \
      const uint32_t* o_ids, const float* o_w, const uint32_t* o_seg, T* dw, int u, int bo,   \
      int stride_self, int stride_other) {                                                    \
    lexical_bwd<T>(ds, ids, seq, warg, o_ids, o_w, o_seg, dw, u, bo, stride_self,             \
                   stride_other);                                                             \
  }
FOR_FLOAT_TYPES(INSTANTIATE)
