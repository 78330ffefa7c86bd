// bf16 tensor-core helpers shared by the flash attention kernels (flash.cu, flash_bwd.cu):
// register packing and mma.sync m16n8k16 with f32 accumulation. Fragment layouts are
// documented at the top of flash.cu.
#pragma once
#include "common.cuh"

#define KT 64  // keys per tile (both kernels)

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t load_pair(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Two bf16 from different rows (same column) packed into one register.
__device__ __forceinline__ uint32_t gather_pair(const bf16* lo, const bf16* hi) {
  __nv_bfloat162 v;
  v.x = *lo;
  v.y = *hi;
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}


// A fragments (16 rows x D, row-major) of rows r_lo = row g, r_hi = row g + 8 of a tile,
// zero for rows past the sequence.
template <int D>
__device__ __forceinline__ void load_a_frags(uint32_t a[D / 16][4], const bf16* __restrict__ x,
                                             uint32_t r_lo, uint32_t r_hi, bool ok_lo,
                                             bool ok_hi, int64_t hidden, int64_t col0, int i) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + 2 * i;
    const bf16* lo = x + (int64_t)r_lo * hidden + col0 + c;
    const bf16* hi = x + (int64_t)r_hi * hidden + col0 + c;
    a[kk][0] = ok_lo ? load_pair(lo) : 0u;
    a[kk][1] = ok_hi ? load_pair(hi) : 0u;
    a[kk][2] = ok_lo ? load_pair(lo + 8) : 0u;
    a[kk][3] = ok_hi ? load_pair(hi + 8) : 0u;
  }
}

// Cooperative copy of rows first .. first + R (zeros past end) of two [*, hidden] tensors'
// head columns into shared tiles; 128 threads, 8 bf16 per thread per step.
template <int D, int R>
__device__ __forceinline__ void load_tiles(bf16 (*xs)[D + 8], bf16 (*ys)[D + 8],
                                           const bf16* __restrict__ x,
                                           const bf16* __restrict__ y, uint32_t first,
                                           uint32_t end, int64_t hidden, int64_t col0) {
  for (int e = threadIdx.x * 8; e < R * D; e += 128 * 8) {
    const int r = e / D, c = e % D;
    const uint32_t row = first + r;
    uint4 xv = make_uint4(0, 0, 0, 0), yv = make_uint4(0, 0, 0, 0);
    if (row < end) {
      xv = *reinterpret_cast<const uint4*>(x + (int64_t)row * hidden + col0 + c);
      yv = *reinterpret_cast<const uint4*>(y + (int64_t)row * hidden + col0 + c);
    }
    *reinterpret_cast<uint4*>(&xs[r][c]) = xv;
    *reinterpret_cast<uint4*>(&ys[r][c]) = yv;
  }
}

// Stores a 16 x D f32 accumulator (C layout: rows g and g + 8) as bf16, row g times mul_lo
// and row g + 8 times mul_hi; rows past the sequence are not written.
template <int D>
__device__ __forceinline__ void store_c(bf16* __restrict__ y, const float acc[D / 8][4],
                                        float mul_lo, float mul_hi, uint32_t r_lo,
                                        uint32_t r_hi, bool ok_lo, bool ok_hi, int64_t hidden,
                                        int64_t col0, int i) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * i;
    if (ok_lo)
      *reinterpret_cast<uint32_t*>(y + (int64_t)r_lo * hidden + col0 + c) =
          pack_bf16(acc[n][0] * mul_lo, acc[n][1] * mul_lo);
    if (ok_hi)
      *reinterpret_cast<uint32_t*>(y + (int64_t)r_hi * hidden + col0 + c) =
          pack_bf16(acc[n][2] * mul_hi, acc[n][3] * mul_hi);
  }
}

// ldmatrix: four 8x8 b16 matrices from shared memory, one row address per lane (lanes 8j ..
// 8j + 7 give matrix j's rows, 16-byte aligned). Without .trans lane 4g + i receives
// (row g, cols 2i, 2i + 1) of each matrix; with .trans (rows 2i, 2i + 1, col g).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const bf16* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
