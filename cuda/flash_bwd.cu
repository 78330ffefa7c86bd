// FlashAttention-2 style backward on packed variable-length batches (non-causal), bf16 in
// and out, f32 accumulation on tensor cores (mma.sync m16n8k16, fragment layouts at the top
// of flash.cu). Scores are recomputed tile by tile from the forward's log-sum-exp: no L x L
// buffer, memory linear in sequence length. Three launches, no atomics (deterministic, like
// the naive kernels it replaces; FA2 proper accumulates dQ with atomics instead):
//   1. delta[t, h] = dout_t . out_t (f32), one warp per (row, head);
//   2. dK, dV per 64-key tile, looping over the sequence's query tiles;
//   3. dQ per 64-query tile, looping over the sequence's key tiles (recomputes S and dP).
// With P = exp(scale q.k - lse), dP = dout v^T, dS = P (dP - delta):
//   dV = P^T dout, dK = scale dS^T Q, dQ = scale dS K.
//
// Shapes: dout, q, k, v, out, dq, dk, dv bf16 [T, heads * D] (head h in columns h*D ..);
// lse, delta f32 [T, heads]; tiles u32 [2 * ntiles] = (sequence, first row) per 64-row tile
// (the forward's); cu u32 [nseq + 1].
#include "common.cuh"
#include "mma.cuh"

// Launch: grid ceil(T * heads / 8), 256 threads; warp w of block b takes pair b * 8 + w.
__device__ void flash_bwd_delta(const bf16* __restrict__ dout, const bf16* __restrict__ out,
                                float* __restrict__ delta, int rows, int heads, int D) {
  const int r = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP, lane = threadIdx.x % WARP;
  if (r >= rows * heads) return;
  const int64_t base = (int64_t)(r / heads) * heads * D + (int64_t)(r % heads) * D;
  float s = 0.f;
  for (int c = lane; c < D; c += 32) s += to_f(dout[base + c]) * to_f(out[base + c]);
  s = warp_sum(s);
  if (lane == 0) delta[r] = s;
}

// dK and dV of one 64-key tile. Launch: grid (key tiles, heads), 128 threads = 4 warps;
// warp w owns keys tile + 16w .. +16 (K and V as A fragments in registers, dK and dV
// accumulators in C layout). Queries stream through shared memory QT rows at a time
// (QT = 64, or 16 at D = 128 to stay within registers).
template <int D, int QT>
__device__ void flash_bwd_dkv(const bf16* __restrict__ dout, const bf16* __restrict__ q,
                              const bf16* __restrict__ k, const bf16* __restrict__ v,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              bf16* __restrict__ dk, bf16* __restrict__ dv,
                              const uint32_t* __restrict__ tiles,
                              const uint32_t* __restrict__ cu, int heads, float scale) {
  __shared__ __align__(16) bf16 qs[QT][D + 8];
  __shared__ __align__(16) bf16 dos[QT][D + 8];
  __shared__ float lse_s[QT], delta_s[QT];
  const int h = blockIdx.y;
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, i = lane % 4;
  const int64_t hidden = (int64_t)heads * D, col0 = (int64_t)h * D;
  const uint32_t seq = tiles[2 * blockIdx.x], k0 = tiles[2 * blockIdx.x + 1];
  const uint32_t s0 = cu[seq], s1 = cu[seq + 1];
  const uint32_t r_lo = k0 + warp * 16 + g, r_hi = r_lo + 8;
  const bool ok_lo = r_lo < s1, ok_hi = r_hi < s1;
  uint32_t ka[D / 16][4], va[D / 16][4];
  load_a_frags<D>(ka, k, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
  load_a_frags<D>(va, v, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.f;

  for (uint32_t q0 = s0; q0 < s1; q0 += QT) {
    __syncthreads();  // the previous tile's readers are done
    load_tiles<D, QT>(qs, dos, q, dout, q0, s1, hidden, col0);
    for (int r = threadIdx.x; r < QT; r += FLASH_THREADS) {
      const uint32_t row = q0 + r;
      lse_s[r] = row < s1 ? lse[(int64_t)row * heads + h] : 0.f;
      delta_s[r] = row < s1 ? delta[(int64_t)row * heads + h] : 0.f;
    }
    __syncthreads();
    // S^T = K Q^T (16 keys x QT queries) and dP^T = V dout^T, both with Q / dout rows as
    // the B operand (k = d, n = query).
    float st[QT / 8][4], dpt[QT / 8][4];
#pragma unroll
    for (int n = 0; n < QT / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const bf16* qr = &qs[n * 8 + g][kk * 16 + 2 * i];
        const bf16* dr = &dos[n * 8 + g][kk * 16 + 2 * i];
        mma_bf16(st[n], ka[kk], load_pair(qr), load_pair(qr + 8));
        mma_bf16(dpt[n], va[kk], load_pair(dr), load_pair(dr + 8));
      }
    }
    // P^T (queries past the sequence masked to 0) and dS^T = P^T (dP^T - delta), per column.
#pragma unroll
    for (int n = 0; n < QT / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * i + (e & 1);
        const float p = q0 + col < s1 ? expf(st[n][e] * scale - lse_s[col]) : 0.f;
        st[n][e] = p;
        dpt[n][e] = p * (dpt[n][e] - delta_s[col]);
      }
    // dV += P^T dout and dK += dS^T Q: A from pairs of query n-tiles, B gathered
    // column-wise from the shared rows (k = query, n = d).
#pragma unroll
    for (int kk = 0; kk < QT / 16; ++kk) {
      uint32_t pa[4], sa[4];
      pa[0] = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
      pa[1] = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
      pa[2] = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      pa[3] = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      sa[0] = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
      sa[1] = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
      sa[2] = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      sa[3] = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      const int qr = kk * 16 + 2 * i;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int dc = n * 8 + g;
        mma_bf16(dva[n], pa, gather_pair(&dos[qr][dc], &dos[qr + 1][dc]),
                 gather_pair(&dos[qr + 8][dc], &dos[qr + 9][dc]));
        mma_bf16(dka[n], sa, gather_pair(&qs[qr][dc], &qs[qr + 1][dc]),
                 gather_pair(&qs[qr + 8][dc], &qs[qr + 9][dc]));
      }
    }
  }
  store_c<D>(dk, dka, scale, scale, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
  store_c<D>(dv, dva, 1.f, 1.f, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
}

// dQ of one 64-query tile. Launch: grid (query tiles, heads), 128 threads = 4 warps; warp
// w owns queries tile + 16w .. +16 (Q and dout as A fragments in registers); keys and
// values stream through shared memory 64 rows at a time, as in the forward.
template <int D>
__device__ void flash_bwd_dq(const bf16* __restrict__ dout, const bf16* __restrict__ q,
                             const bf16* __restrict__ k, const bf16* __restrict__ v,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             bf16* __restrict__ dq, const uint32_t* __restrict__ tiles,
                             const uint32_t* __restrict__ cu, int heads, float scale) {
  __shared__ __align__(16) bf16 ks[KT][D + 8];
  __shared__ __align__(16) bf16 vs[KT][D + 8];
  const int h = blockIdx.y;
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, i = lane % 4;
  const int64_t hidden = (int64_t)heads * D, col0 = (int64_t)h * D;
  const uint32_t seq = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
  const uint32_t s0 = cu[seq], s1 = cu[seq + 1];
  const uint32_t r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
  const bool ok_lo = r_lo < s1, ok_hi = r_hi < s1;
  uint32_t qa[D / 16][4], da[D / 16][4];
  load_a_frags<D>(qa, q, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
  load_a_frags<D>(da, dout, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
  const float lse_lo = ok_lo ? lse[(int64_t)r_lo * heads + h] : 0.f;
  const float lse_hi = ok_hi ? lse[(int64_t)r_hi * heads + h] : 0.f;
  const float del_lo = ok_lo ? delta[(int64_t)r_lo * heads + h] : 0.f;
  const float del_hi = ok_hi ? delta[(int64_t)r_hi * heads + h] : 0.f;
  float dqa[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dqa[n][e] = 0.f;

  for (uint32_t k0 = s0; k0 < s1; k0 += KT) {
    __syncthreads();
    load_tiles<D, KT>(ks, vs, k, v, k0, s1, hidden, col0);
    __syncthreads();
    // S = Q K^T and dP = dout V^T (16 queries x 64 keys), K / V rows as the B operand.
    float s[KT / 8][4], dp[KT / 8][4];
#pragma unroll
    for (int n = 0; n < KT / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const bf16* kr = &ks[n * 8 + g][kk * 16 + 2 * i];
        const bf16* vr = &vs[n * 8 + g][kk * 16 + 2 * i];
        mma_bf16(s[n], qa[kk], load_pair(kr), load_pair(kr + 8));
        mma_bf16(dp[n], da[kk], load_pair(vr), load_pair(vr + 8));
      }
    }
    // dS = P (dP - delta), keys past the sequence masked to 0.
#pragma unroll
    for (int n = 0; n < KT / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t key = k0 + n * 8 + 2 * i + (e & 1);
        const bool hi = e >= 2;
        const float p = key < s1 ? expf(s[n][e] * scale - (hi ? lse_hi : lse_lo)) : 0.f;
        s[n][e] = p * (dp[n][e] - (hi ? del_hi : del_lo));
      }
    // dQ += dS K: A from pairs of key n-tiles, B = K gathered column-wise (k = key, n = d).
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      uint32_t sa[4];
      sa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      sa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      sa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      sa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int kr = kk * 16 + 2 * i;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int dc = n * 8 + g;
        mma_bf16(dqa[n], sa, gather_pair(&ks[kr][dc], &ks[kr + 1][dc]),
                 gather_pair(&ks[kr + 8][dc], &ks[kr + 9][dc]));
      }
    }
  }
  store_c<D>(dq, dqa, scale, scale, r_lo, r_hi, ok_lo, ok_hi, hidden, col0, i);
}

extern "C" __global__ void __launch_bounds__(ROW_BLOCK_THREADS)
    attention_bwd_delta_bf16(const bf16* dout, const bf16* out, float* delta, int rows,
                             int heads, int d) {
  flash_bwd_delta(dout, out, delta, rows, heads, d);
}

#define INSTANTIATE(D, QT)                                                                  \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS) attention_bwd_dkv_flash_d##D##_bf16(   \
      const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,      \
      const float* delta, bf16* dk, bf16* dv, const uint32_t* tiles, const uint32_t* cu,    \
      int heads, float scale) {                                                             \
    flash_bwd_dkv<D, QT>(dout, q, k, v, lse, delta, dk, dv, tiles, cu, heads, scale);       \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS) attention_bwd_dq_flash_d##D##_bf16(    \
      const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,      \
      const float* delta, bf16* dq, const uint32_t* tiles, const uint32_t* cu, int heads,   \
      float scale) {                                                                        \
    flash_bwd_dq<D>(dout, q, k, v, lse, delta, dq, tiles, cu, heads, scale);                \
  }
INSTANTIATE(32, 64)
INSTANTIATE(64, 64)
INSTANTIATE(128, 16)
