// Multi-head attention over packed variable-length batches (non-causal).
//
// These are the first, simple kernels: one warp per (row, head), an online softmax over that
// row's keys, f32 accumulation; the backward in two passes (dq, then dk and dv). They are the
// correctness baseline the FlashAttention-2 style tensor-core kernels (issues 5-6) will be
// measured against, not the fast path.
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

// The sequence [s0, s1) holding row t (the last i with cu[i] <= t).
__device__ __forceinline__ void seq_of_row(const uint32_t* __restrict__ cu, int nseq, int t,
                                           int* s0, int* s1) {
  int lo = 0, hi = nseq;
  while (hi - lo > 1) {
    int mid = (lo + hi) / 2;
    if ((int)cu[mid] <= t) lo = mid; else hi = mid;
  }
  *s0 = cu[lo];
  *s1 = cu[lo + 1];
}

// Backward, naive (the correctness baseline for issue 6's FlashAttention-2 backward), from
// the saved log-sum-exp, recomputing P = exp(scale q.k - lse) pair by pair; no L x L buffer.
// Pass 1, per (query row t, head h): delta[t, h] = sum_c dout . out (written for pass 2) and
//   dq_t = scale * sum_j P_tj (dout_t . v_j - delta) k_j.
// Pass 2, per (key row j, head h): dv_j = sum_i P_ij dout_i,
//   dk_j = scale * sum_i P_ij (dout_i . v_j - delta_i) q_i.
// Each output row is owned by one warp and summed in key / query order: no atomics,
// deterministic. Shapes as the forward; delta f32 [T, heads]. Launch (both passes): grid
// (T, heads), one warp per block, lane l holds dims l, l+32, ...
template <typename T, int DPL>
__device__ void attention_bwd_dq_naive(const T* __restrict__ dout, const T* __restrict__ q,
                                       const T* __restrict__ k, const T* __restrict__ v,
                                       const T* __restrict__ out, const float* __restrict__ lse,
                                       const uint32_t* __restrict__ cu, float* __restrict__ delta,
                                       T* __restrict__ dq, int nseq, int heads, int D,
                                       float scale) {
  int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  int hidden = heads * D;
  int s0, s1;
  seq_of_row(cu, nseq, t, &s0, &s1);
  int64_t at = (int64_t)t * hidden + h * D;
  float qr[DPL], dor[DPL], acc[DPL];
  float dd = 0.f;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int c = lane + 32 * i;
    qr[i] = c < D ? to_f(q[at + c]) : 0.f;
    dor[i] = c < D ? to_f(dout[at + c]) : 0.f;
    // Explicit fmas here and in both dp sums: with one key out == v, and delta must then
    // equal dp bit for bit so dS is exactly zero (the CPU reference's answer).
    if (c < D) dd = __fmaf_rn(dor[i], to_f(out[at + c]), dd);
    acc[i] = 0.f;
  }
  dd = warp_sum(dd);
  float l = lse[(int64_t)t * heads + h];
  for (int j = s0; j < s1; ++j) {
    int64_t aj = (int64_t)j * hidden + h * D;
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      int c = lane + 32 * i;
      if (c < D) {
        s += qr[i] * to_f(k[aj + c]);
        dp = __fmaf_rn(dor[i], to_f(v[aj + c]), dp);
      }
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    float ds = expf(scale * s - l) * (dp - dd);
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      int c = lane + 32 * i;
      if (c < D) acc[i] += ds * to_f(k[aj + c]);
    }
  }
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int c = lane + 32 * i;
    if (c < D) dq[at + c] = from_f<T>(scale * acc[i]);
  }
  if (lane == 0) delta[(int64_t)t * heads + h] = dd;
}

template <typename T, int DPL>
__device__ void attention_bwd_dkv_naive(const T* __restrict__ dout, const T* __restrict__ q,
                                        const T* __restrict__ k, const T* __restrict__ v,
                                        const float* __restrict__ lse,
                                        const float* __restrict__ delta,
                                        const uint32_t* __restrict__ cu, T* __restrict__ dk,
                                        T* __restrict__ dv, int nseq, int heads, int D,
                                        float scale) {
  int j = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  int hidden = heads * D;
  int s0, s1;
  seq_of_row(cu, nseq, j, &s0, &s1);
  int64_t aj = (int64_t)j * hidden + h * D;
  float kr[DPL], vr[DPL], dk_acc[DPL], dv_acc[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int c = lane + 32 * i;
    kr[i] = c < D ? to_f(k[aj + c]) : 0.f;
    vr[i] = c < D ? to_f(v[aj + c]) : 0.f;
    dk_acc[i] = 0.f;
    dv_acc[i] = 0.f;
  }
  for (int r = s0; r < s1; ++r) {
    int64_t ar = (int64_t)r * hidden + h * D;
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      int c = lane + 32 * i;
      if (c < D) {
        s += to_f(q[ar + c]) * kr[i];
        dp = __fmaf_rn(to_f(dout[ar + c]), vr[i], dp);
      }
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    float p = expf(scale * s - lse[(int64_t)r * heads + h]);
    float ds = p * (dp - delta[(int64_t)r * heads + h]);
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      int c = lane + 32 * i;
      if (c < D) {
        dv_acc[i] += p * to_f(dout[ar + c]);
        dk_acc[i] += ds * to_f(q[ar + c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int c = lane + 32 * i;
    if (c < D) {
      dk[aj + c] = from_f<T>(scale * dk_acc[i]);
      dv[aj + c] = from_f<T>(dv_acc[i]);
    }
  }
}

#define INSTANTIATE_D(SUF, T, D)                                                            \
  extern "C" __global__ void attention_fwd_naive_d##D##_##SUF(                             \
      const T* q, const T* k, const T* v, T* out, float* lse, const uint32_t* cu, int nseq, \
      int heads, int d, float scale) {                                                      \
    attention_fwd_naive<T, D / 32>(q, k, v, out, lse, cu, nseq, heads, d, scale);           \
  }                                                                                         \
  extern "C" __global__ void attention_bwd_dq_naive_d##D##_##SUF(                          \
      const T* dout, const T* q, const T* k, const T* v, const T* out, const float* lse,   \
      const uint32_t* cu, float* delta, T* dq, int nseq, int heads, int d, float scale) {  \
    attention_bwd_dq_naive<T, D / 32>(dout, q, k, v, out, lse, cu, delta, dq, nseq, heads, \
                                      d, scale);                                            \
  }                                                                                         \
  extern "C" __global__ void attention_bwd_dkv_naive_d##D##_##SUF(                         \
      const T* dout, const T* q, const T* k, const T* v, const float* lse,                 \
      const float* delta, const uint32_t* cu, T* dk, T* dv, int nseq, int heads, int d,    \
      float scale) {                                                                        \
    attention_bwd_dkv_naive<T, D / 32>(dout, q, k, v, lse, delta, cu, dk, dv, nseq, heads, \
                                       d, scale);                                           \
  }
#define INSTANTIATE(SUF, T) \
  INSTANTIATE_D(SUF, T, 32) INSTANTIATE_D(SUF, T, 64) INSTANTIATE_D(SUF, T, 128)
FOR_FLOAT_TYPES(INSTANTIATE)
