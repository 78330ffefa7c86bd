// Launch geometry that the kernels and their Rust launches (src/backend/cuda/) share:
// build.rs writes each `#define NAME <integer>` line below as `pub const NAME: u32` into
// the generated kernels.rs, so each value is written here only.
#pragma once

// Threads per warp.
#define WARP 32

// Warp-per-row kernels (LayerNorm, normalize, cross-entropy, distillation, the flash
// backward's delta, max-sim and sparse queries): one warp per row, ROWS_PER_BLOCK rows per
// block of ROW_BLOCK_THREADS threads.
#define ROW_BLOCK_THREADS 256
#define ROWS_PER_BLOCK 8

// The bf16 register-resident add_layernorm: columns a warp covers per round of 16-byte
// loads (WARP lanes x 8 bf16); rows of 1 to 4 such chunks have an instantiation.
#define LN_VEC_COLS 256

// Column-per-thread kernels (the LayerNorm gain and shift gradients): threads per block.
#define COL_BLOCK_THREADS 256

// sum_rows: a block is SUM_ROWS_COLS columns by SUM_ROWS_STRIDES row strides.
#define SUM_ROWS_COLS 32
#define SUM_ROWS_STRIDES 8

// f64 tree reductions (sum_all, sum_squares): threads per block, and sum_squares' fixed
// number of blocks (= its partial sums, added on the host in order).
#define REDUCE_THREADS 256
#define SUM_SQUARES_BLOCKS 256

// Flash attention (flash.cu, flash_bwd.cu): blocks of FLASH_THREADS threads (4 warps of 16
// rows, mma's M) over FLASH_TILE_ROWS-row tiles of a sequence, listed by the host.
#define FLASH_THREADS 128
#define FLASH_TILE_ROWS 64

static_assert(ROWS_PER_BLOCK * WARP == ROW_BLOCK_THREADS, "one warp per row");
static_assert((FLASH_THREADS / WARP) * 16 == FLASH_TILE_ROWS, "16 rows per warp");
static_assert(LN_VEC_COLS == WARP * 8, "8 bf16 per lane per round");
static_assert((REDUCE_THREADS & (REDUCE_THREADS - 1)) == 0, "tree reduction halves");
