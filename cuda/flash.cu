// FlashAttention-2 style forward on packed variable-length batches (non-causal), bf16 in and
// out, f32 accumulation on tensor cores (mma.sync m16n8k16), online softmax, log-sum-exp
// written for the backward. Memory is linear in sequence length: any length runs.
//
// Shapes: q, k, v, out bf16 [T, heads * D] (head h in columns h*D ..), lse f32 [T, heads]
// = log sum_j exp(scale * q.k_j) (natural log, as the naive kernel), tiles u32 [2 * ntiles]
// = (sequence start, query row start) per 64-row query tile, cu u32 [nseq + 1] unused here
// beyond the tiles (the host builds them from it). Launch: grid (ntiles, heads), 128 threads
// = 4 warps; warp w owns query rows tile + 16w .. +16; keys stream through shared memory
// in tiles of 64. D is 32, 64 or 128 (a template argument).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 * g + i (g = group 0..7,
// i = 0..3). A (16x16, row): a[0] = (g, 2i..2i+1), a[1] = (g+8, 2i..), a[2] = (g, 2i+8..),
// a[3] = (g+8, 2i+8..). B (16x8, col): b[0] = (k 2i..2i+1, n g), b[1] = (k 2i+8.., n g).
// C (16x8 f32): c[0..1] = (g, 2i..2i+1), c[2..3] = (g+8, 2i..2i+1). The S = QK^T
// accumulator of two adjacent key n-tiles is exactly the A fragment of P for P V.
#include "common.cuh"
#include "mma.cuh"

// LDM = true is the variant being brought up (opt-in until it passes on a GPU): K and V
// B fragments through ldmatrix (.trans for V) instead of 32- and 16-bit shared loads (the
// V gather cost four 16-bit loads per mma), and exp2 with log2(e) folded into the scale.
template <int D, bool LDM>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, bf16* __restrict__ out,
                          float* __restrict__ lse, const uint32_t* __restrict__ tiles,
                          const uint32_t* __restrict__ cu, int nseq, int heads, float scale) {
  // Shared K and V tiles, rows padded by 8 bf16 so the column-wise V reads spread over banks.
  __shared__ __align__(16) bf16 ks[KT][D + 8];
  __shared__ __align__(16) bf16 vs[KT][D + 8];
  const int h = blockIdx.y;
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, i = lane % 4;
  const int hidden = heads * D;
  const uint32_t seq = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
  const uint32_t s0 = cu[seq], s1 = cu[seq + 1];
  const int64_t col0 = (int64_t)h * D;
  // This warp's two query rows per lane (g and g + 8 of its 16).
  const uint32_t r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
  const bool ok_lo = r_lo < s1, ok_hi = r_hi < s1;

  // Q fragments for all D / 16 k-steps, zero for rows past the sequence.
  uint32_t qa[D / 16][4];
  load_a_frags<D>(qa, q, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  for (uint32_t k0 = s0; k0 < s1; k0 += KT) {
    __syncthreads();  // the previous tile's readers are done
    // K and V rows k0 .. k0 + KT (zeros past the sequence).
    load_tiles<D, KT>(ks, vs, k, v, k0, s1, hidden, col0);
    __syncthreads();
    // S = Q K^T for 64 keys: 8 n-tiles of 8 keys.
    float s[KT / 8][4];
#pragma unroll
    for (int n = 0; n < KT / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    if constexpr (LDM) {
      // One ldmatrix.x4 per (16 keys, 16 dims): matrix j = lane / 8 holds keys + (j / 2) * 8,
      // dims + (j % 2) * 8, i.e. b0, b1 of n-tile 2 n2 and of n-tile 2 n2 + 1.
      const int j = lane / 8, r = lane % 8;
#pragma unroll
      for (int n2 = 0; n2 < KT / 16; ++n2)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t b[4];
          ldmatrix_x4(b, &ks[n2 * 16 + (j / 2) * 8 + r][kk * 16 + (j % 2) * 8]);
          mma_bf16(s[2 * n2], qa[kk], b[0], b[1]);
          mma_bf16(s[2 * n2 + 1], qa[kk], b[2], b[3]);
        }
    } else {
#pragma unroll
      for (int n = 0; n < KT / 8; ++n)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const bf16* kr = &ks[n * 8 + g][kk * 16 + 2 * i];
          mma_bf16(s[n], qa[kk], load_pair(kr), load_pair(kr + 8));
        }
    }
    // Scale (by log2(e) too with exp2), mask keys past the sequence, and the online softmax
    // per row.
    const float sc = LDM ? scale * 1.4426950408889634f : scale;
    float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
    for (int n = 0; n < KT / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t key = k0 + n * 8 + 2 * i + (e & 1);
        s[n][e] = key < s1 ? s[n][e] * sc : -INFINITY;
      }
      mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
    }
    // The four lanes of a group hold one row's columns.
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    auto ex = [](float x) { return LDM ? exp2f(x) : expf(x); };
    const float corr_lo = ex(m_lo - mx_lo), corr_hi = ex(m_hi - mx_hi);
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int n = 0; n < KT / 8; ++n) {
      s[n][0] = ex(s[n][0] - mx_lo);
      s[n][1] = ex(s[n][1] - mx_lo);
      s[n][2] = ex(s[n][2] - mx_hi);
      s[n][3] = ex(s[n][3] - mx_hi);
      sum_lo += s[n][0] + s[n][1];
      sum_hi += s[n][2] + s[n][3];
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, off);
      sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, off);
    }
    l_lo = l_lo * corr_lo + sum_lo;
    l_hi = l_hi * corr_hi + sum_hi;
    m_lo = mx_lo;
    m_hi = mx_hi;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= corr_lo;
      o[n][1] *= corr_lo;
      o[n][2] *= corr_hi;
      o[n][3] *= corr_hi;
    }
    // O += P V: P's A fragments from pairs of S n-tiles; V as the B operand (k = key,
    // n = d), gathered column-wise from shared memory.
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      if constexpr (LDM) {
        // One ldmatrix.x4.trans per (16 keys, 16 dims): matrix j holds keys + (j % 2) * 8,
        // dims + (j / 2) * 8, i.e. b0, b1 of d n-tile 2 n2 and of 2 n2 + 1.
        const int j = lane / 8, r = lane % 8;
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, &vs[kk * 16 + (j % 2) * 8 + r][n2 * 16 + (j / 2) * 8]);
          mma_bf16(o[2 * n2], pa, b[0], b[1]);
          mma_bf16(o[2 * n2 + 1], pa, b[2], b[3]);
        }
      } else {
        const int kr = kk * 16 + 2 * i;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          const int dc = n * 8 + g;
          uint32_t b0 = gather_pair(&vs[kr][dc], &vs[kr + 1][dc]);
          uint32_t b1 = gather_pair(&vs[kr + 8][dc], &vs[kr + 9][dc]);
          mma_bf16(o[n], pa, b0, b1);
        }
      }
    }
  }
  // Normalise and store; rows past the sequence are not written.
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  store_c<D>(out, o, inv_lo, inv_hi, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
  // The running max is in log2 units with exp2: back to a natural log-sum-exp.
  const float to_ln = LDM ? 0.6931471805599453f : 1.f;
  if (i == 0) {
    if (ok_lo) lse[(int64_t)r_lo * heads + h] = m_lo * to_ln + logf(l_lo);
    if (ok_hi) lse[(int64_t)r_hi * heads + h] = m_hi * to_ln + logf(l_hi);
  }
}

#define INSTANTIATE(D)                                                                     \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                        \
      attention_fwd_flash_d##D##_bf16(const bf16* q, const bf16* k, const bf16* v,         \
                                      bf16* out, float* lse, const uint32_t* tiles,        \
                                      const uint32_t* cu, int nseq, int heads, float scale) { \
    flash_fwd<D, false>(q, k, v, out, lse, tiles, cu, nseq, heads, scale);                 \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 2)                                     \
      attention_fwd_flash_ldm_d##D##_bf16(const bf16* q, const bf16* k, const bf16* v,     \
                                          bf16* out, float* lse, const uint32_t* tiles,    \
                                          const uint32_t* cu, int nseq, int heads,         \
                                          float scale) {                                   \
    flash_fwd<D, true>(q, k, v, out, lse, tiles, cu, nseq, heads, scale);                  \
  }
INSTANTIATE(32)
INSTANTIATE(64)
INSTANTIATE(128)
