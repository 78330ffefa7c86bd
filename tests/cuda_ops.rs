//! CUDA backend against the CPU reference: every op forward and backward, f32 and bf16,
//! outputs poisoned (NaN-filled) before each kernel runs, on shapes that are not multiples
//! of any tile. Skips with a message where no GPU is present, unless M3_REQUIRE_GPU=1 (the
//! GPU bundle sets it, so a machine without a working GPU fails loudly there).
#![cfg(feature = "cuda")]

use m3::backend::cuda::Cuda;
use m3::backend::Backend;
use m3::gradcheck::{cross_check, cross_tolerance, CaseDims};
use m3::{DType, HostData};
use proptest::prelude::*;

fn gpu() -> Option<Cuda> {
    if !Cuda::available() {
        if std::env::var_os("M3_REQUIRE_GPU").is_some() {
            panic!("M3_REQUIRE_GPU is set but no CUDA GPU / libcuda / cuBLASLt was found");
        }
        eprintln!("skipping: no CUDA GPU (libcuda, cuBLASLt or a device is missing)");
        return None;
    }
    let dev = Cuda::new(0).expect("open CUDA device 0");
    dev.set_poison(true);
    Some(dev)
}

fn assert_close(dev: &Cuda, dims: CaseDims, dtype: DType, seed: u64) {
    let rows = cross_check(dev, dims, dtype, seed).expect("cross check ran");
    assert!(!rows.is_empty());
    for r in rows {
        assert!(
            r.error <= cross_tolerance(dtype),
            "{} {dtype} {dims:?} seed {seed}: {} relative error {:.3e} > {:.0e}",
            r.name,
            r.worst,
            r.error,
            cross_tolerance(dtype)
        );
    }
}

const FIXED: [CaseDims; 5] = [
    CaseDims {
        rows: 1,
        cols: 1,
        inner: 1,
        vocab: 1,
    },
    CaseDims {
        rows: 17,
        cols: 33,
        inner: 5,
        vocab: 7,
    },
    CaseDims {
        rows: 257,
        cols: 129,
        inner: 65,
        vocab: 300,
    },
    CaseDims {
        rows: 3,
        cols: 1025,
        inner: 19,
        vocab: 2,
    },
    CaseDims {
        rows: 2049,
        cols: 1024,
        inner: 64,
        vocab: 1000,
    },
];

#[test]
fn ops_match_cpu_on_fixed_shapes() {
    let Some(dev) = gpu() else { return };
    for (i, dims) in FIXED.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            assert_close(&dev, *dims, dtype, 100 + i as u64);
        }
    }
}

#[test]
fn ops_match_cpu_at_8192_rows() {
    let Some(dev) = gpu() else { return };
    let dims = CaseDims {
        rows: 8192,
        cols: 64,
        inner: 32,
        vocab: 250,
    };
    assert_close(&dev, dims, DType::BF16, 8192);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn ops_match_cpu_on_random_shapes(
        rows in 1usize..300, cols in 1usize..1100, inner in 1usize..200, vocab in 1usize..500,
        bf16 in any::<bool>(), seed in any::<u64>()
    ) {
        if let Some(dev) = gpu() {
            let dtype = if bf16 { DType::BF16 } else { DType::F32 };
            assert_close(&dev, CaseDims { rows, cols, inner, vocab }, dtype, seed);
        }
    }
}

#[test]
fn poisoned_outputs_are_fully_written() {
    // A poisoned allocation is NaN until written; a kernel that skips an element leaves it.
    let Some(dev) = gpu() else { return };
    let x = dev.upload(HostData::F32(&[1.0; 37]), &[37]).unwrap();
    let fresh = dev.zeros(&[37], DType::F32).unwrap();
    assert!(dev.to_vec_f32(&fresh).unwrap().iter().all(|v| *v == 0.0));
    let y = dev.gelu(&x).unwrap();
    assert!(dev.to_vec_f32(&y).unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn bad_ids_are_rejected_before_launch() {
    let Some(dev) = gpu() else { return };
    let table = dev.upload(HostData::F32(&[0.0; 6]), &[3, 2]).unwrap();
    let ids = dev.upload(HostData::U32(&[0, 3]), &[2]).unwrap();
    let err = dev.embedding(&table, &ids).unwrap_err().to_string();
    assert!(err.contains("id 3"), "{err}");
}
