//! Micro-costs of plugin calls (criterion): a call on a warm, pooled
//! instance against making a fresh instance, and the cost of moving tensors
//! of growing size through a processor. Needs the components built by
//! `cargo xtask plugins` (`cargo xtask bench` does it).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use plinth::plugin::{Kind, Manifest, ModelChoice, Plugin, RequestView, Stage, kind};
use plinth::tensor::Tensor;

fn load<K: Kind>(component: &str) -> Plugin<K> {
    let bytes = std::fs::read(plinth_tests::plugin_wasm(component)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    Plugin::load(component, &bytes, Manifest::default(), cache.path()).unwrap()
}

fn calls(c: &mut Criterion) {
    // image-normalize passes f32 tensors through untouched: what is measured
    // is the call and the copy of the tensor in and out of the guest.
    let plugin = load::<kind::Processor>("image_normalize");
    let view = RequestView::default();
    let small = Tensor::from_f32("x", vec![4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    c.bench_function("processor call, warm pooled instance, 4 floats", |b| {
        b.iter(|| {
            black_box(
                plugin
                    .process(Stage::Pre, &view, vec![small.clone()])
                    .unwrap(),
            )
        })
    });
    c.bench_function("fresh instance (instantiate + init), no pool", |b| {
        b.iter(|| plugin.instantiate_cold().unwrap())
    });
    let mib = Tensor::from_f32("x", vec![1 << 18], &vec![0.5f32; 1 << 18]).unwrap();
    c.bench_function("processor call, warm pooled instance, 1 MiB", |b| {
        b.iter(|| {
            black_box(
                plugin
                    .process(Stage::Pre, &view, vec![mib.clone()])
                    .unwrap(),
            )
        })
    });
    let router = load::<kind::Router>("weighted_router");
    let candidates = vec![ModelChoice {
        name: "m".into(),
        versions: vec!["1".into(), "2".into()],
    }];
    let routed = RequestView {
        id: "r1".into(),
        model: "m".into(),
        ..RequestView::default()
    };
    c.bench_function("router call, warm pooled instance", |b| {
        b.iter(|| black_box(router.route(&routed, &candidates).unwrap()))
    });
    let bytes = std::fs::read(plinth_tests::plugin_wasm("softmax_topk")).unwrap();
    c.bench_function(
        "compile a component, no artifact cache (softmax-topk)",
        |b| {
            b.iter(|| {
                let cache = tempfile::tempdir().unwrap();
                black_box(
                    Plugin::<kind::Processor>::load(
                        "softmax_topk",
                        &bytes,
                        Manifest::default(),
                        cache.path(),
                    )
                    .unwrap(),
                )
            })
        },
    );
    let warm_cache = tempfile::tempdir().unwrap();
    Plugin::<kind::Processor>::load(
        "softmax_topk",
        &bytes,
        Manifest::default(),
        warm_cache.path(),
    )
    .unwrap();
    c.bench_function(
        "load a component from the artifact cache (softmax-topk)",
        |b| {
            b.iter(|| {
                black_box(
                    Plugin::<kind::Processor>::load(
                        "softmax_topk",
                        &bytes,
                        Manifest::default(),
                        warm_cache.path(),
                    )
                    .unwrap(),
                )
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = calls
}
criterion_main!(benches);
