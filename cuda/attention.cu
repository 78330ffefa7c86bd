// Multi-head attention over packed variable-length batches (non-causal).
//
// This is the first, simple forward: one warp per (query row, head), an online softmax
// over that row's keys, f32 accumulation. It is the correctness baseline the FlashAttention-2
// style tensor-core kernel (issue 5) will be measured against, not the fast path.
#include "common.cuh"

// Forward, naive. q, k, v, out: [T, heads * D] (head h in columns h*D ..), cu_seqlens u32
// [nseq + 1] rising from 0 to T; lse f32 [T, heads] = log sum_j exp(scale * q.k_j).
// Launch: grid (T, heads), block 32 (one warp); lane l holds dims l, l+32, ... (up to DPL
// per lane, D <= 32 * DPL, lanes past D idle; loads coalesced across the warp). Memory is
// O(1) per row: any length.
template <typename T, int DPL>
__device__ void attention_fwd_naive(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, T* __restrict__ out,
                                    float* __restrict__ lse, const uint32_t* __restrict__ cu,
                                    int nseq, int heads, int D, float scale) {
  int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  int hidden = heads * D;
  // The sequence holding row t: the last i with cu[i] <= t (so cu[i+1] > t, empty
  // sequences skipped).
  int lo = 0, hi = nseq;
  while (hi - lo > 1) {
    int mid = (lo + hi) / 2;
    if ((int)cu[mid] <= t) lo = mid; else hi = mid;
  }
  int s0 = cu[lo], s1 = cu[lo + 1];
  float qr[DPL], acc[DPL];
  const T* qrow = q + (int64_t)t * hidden + h * D;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int c = lane + 32 * i;
    qr[i] = c < D ? to_f(qrow[c]) * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = s0; j < s1; ++j) {
    const T* krow = k + (int64_t)j * hidden + h * D;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      int c = lane + 32 * i;
      if (c < D) s += qr[i] * to_f(krow[c]);
    }
    s = warp_sum(s);
    float m_new = fmaxf(m, s);
    float corr = expf(m - m_new);
    float p = expf(s - m_new);
    l = l * corr + p;
    const T* vrow = v + (int64_t)j * hidden + h * D;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      int c = lane + 32 * i;
      acc[i] = acc[i] * corr + (c < D ? p * to_f(vrow[c]) : 0.f);
    }
    m = m_new;
  }
  T* orow = out + (int64_t)t * hidden + h * D;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int c = lane + 32 * i;
    if (c < D) orow[c] = from_f<T>(acc[i] / l);
  }
  if (lane == 0) lse[(int64_t)t * heads + h] = m + logf(l);
}

#define INSTANTIATE_D(SUF, T, D)                                                            \
  extern "C" __global__ void attention_fwd_naive_d##D##_##SUF(                             \
      const T* q, const T* k, const T* v, T* out, float* lse, const uint32_t* cu, int nseq, \
      int heads, int d, float scale) {                                                      \
    attention_fwd_naive<T, D / 32>(q, k, v, out, lse, cu, nseq, heads, d, scale);           \
  }
#define INSTANTIATE(SUF, T) \
  INSTANTIATE_D(SUF, T, 32) INSTANTIATE_D(SUF, T, 64) INSTANTIATE_D(SUF, T, 128)
FOR_FLOAT_TYPES(INSTANTIATE)
