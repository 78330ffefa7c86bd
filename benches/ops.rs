//! CPU reference op benchmarks (criterion): BERT-base-sized matmul, LayerNorm and GELU.

use criterion::{criterion_group, criterion_main, Criterion};
use m3::backend::cpu::Cpu;
use m3::backend::Backend;
use m3::rng::Rng;
use m3::{DType, HostData, Tensor};

fn rand(rng: &mut Rng, shape: &[usize]) -> Tensor<Cpu> {
    let n = shape.iter().product();
    Cpu.upload(HostData::F32(&rng.vec(n, -1.0, 1.0)), shape)
        .unwrap()
}

fn ops(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let be = Cpu;
    let x = rand(&mut rng, &[512, 768]);
    let w = rand(&mut rng, &[768, 768]);
    let b = rand(&mut rng, &[768]);
    c.bench_function("cpu linear 512x768 -> 768 +bias", |bch| {
        bch.iter(|| {
            be.matmul(&x, false, &w, true, Some(&b), DType::F32)
                .unwrap()
        })
    });
    let g = rand(&mut rng, &[768]);
    c.bench_function("cpu layernorm 512x768", |bch| {
        bch.iter(|| be.layernorm(&x, &g, &b, 1e-5).unwrap())
    });
    c.bench_function("cpu gelu 512x768", |bch| bch.iter(|| be.gelu(&x).unwrap()));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = ops
}
criterion_main!(benches);
