//! Micro-costs of plugin calls (criterion): a call on a warm, pooled
//! instance against making a fresh instance, and the cost of moving tensors
//! of growing size through a processor. Needs the components built by
//! `cargo xtask plugins` (`cargo xtask bench` does it).

use std::hint::black_box;

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use plinth::config::ModelRepository;
use plinth::pipeline::{Pipeline, PipelineRequest};
use plinth::plugin::{
    Candidates, Kind, Manifest, ModelChoice, Plugin, PluginHost, RequestView, Stage, kind,
};
use plinth::registry::{LoadMode, Registry, RegistrySettings};
use plinth::tensor::Tensor;
use plinth_tests::fixtures;

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
    let candidates = Candidates::from(
        &[ModelChoice {
            name: "m".into(),
            versions: vec!["1".into(), "2".into()],
        }][..],
    );
    let routed = RequestView {
        id: "r1".into(),
        model: "m".into(),
        ..RequestView::default()
    };
    c.bench_function("router call, warm pooled instance", |b| {
        b.iter(|| black_box(router.route(&routed, &candidates).unwrap()))
    });
    // What a router that exports `mirror` adds to every routed request,
    // even with no mirror configured: one more guest call.
    let decision = router.route(&routed, &candidates).unwrap();
    assert!(router.mirrors_requests());
    c.bench_function(
        "router mirrors call (none configured), warm pooled instance",
        |b| b.iter(|| black_box(router.mirrors(&routed, &decision).unwrap())),
    );
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

/// The Python example (plugins/image-normalize-py, componentize-py)
/// beside the Rust plugin it ports, with the same configuration: a call
/// that only crosses the boundary (f32 passes through both), a small and an
/// ImageNet-sized image, and a fresh instance. Both produce the same bits.
fn python_beside_rust(c: &mut Criterion) {
    let config: std::collections::BTreeMap<String, String> =
        [("mean", "0.485,0.456,0.406"), ("std", "0.229,0.224,0.225")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    let manifest = Manifest {
        // A CPython guest's large image is far past the 50 ms default.
        deadline: std::time::Duration::from_secs(5),
        config,
        ..Manifest::default()
    };
    let cache = tempfile::tempdir().unwrap();
    let load = |component: &str| -> Plugin<kind::Processor> {
        let bytes = std::fs::read(plinth_tests::plugin_wasm(component)).unwrap();
        let started = std::time::Instant::now();
        let plugin = Plugin::load(component, &bytes, manifest.clone(), cache.path()).unwrap();
        println!(
            "{component}: {} KiB, compiled and validated in {:.2?} (one run, no artifact cache)",
            bytes.len() / 1024,
            started.elapsed()
        );
        plugin
    };
    let plugins = [
        ("Rust", load("image_normalize")),
        ("Python", load("image_normalize_py")),
    ];
    let view = RequestView::default();
    let floats = Tensor::from_f32("x", vec![4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let image = |side: i64| {
        let pixels: Vec<u8> = (0..side * side * 3).map(|i| (i * 37 % 256) as u8).collect();
        Tensor::new(
            "image",
            plinth::tensor::DType::U8,
            vec![1, side, side, 3],
            pixels.into(),
        )
        .unwrap()
    };
    let (small, large) = (image(32), image(224));
    // Same bits from both before anything is timed.
    let outputs: Vec<_> = plugins
        .iter()
        .map(|(_, p)| p.process(Stage::Pre, &view, vec![large.clone()]).unwrap())
        .collect();
    assert_eq!(
        outputs[0][0].data(),
        outputs[1][0].data(),
        "Rust and Python differ"
    );
    for (lang, plugin) in &plugins {
        c.bench_function(
            &format!("image-normalize ({lang}): call, 4 f32 passed through"),
            |b| {
                b.iter(|| {
                    black_box(
                        plugin
                            .process(Stage::Pre, &view, vec![floats.clone()])
                            .unwrap(),
                    )
                })
            },
        );
        c.bench_function(
            &format!("image-normalize ({lang}): call, u8 image 1x32x32x3"),
            |b| {
                b.iter(|| {
                    black_box(
                        plugin
                            .process(Stage::Pre, &view, vec![small.clone()])
                            .unwrap(),
                    )
                })
            },
        );
        c.bench_function(
            &format!("image-normalize ({lang}): call, u8 image 1x224x224x3"),
            |b| {
                b.iter(|| {
                    black_box(
                        plugin
                            .process(Stage::Pre, &view, vec![large.clone()])
                            .unwrap(),
                    )
                })
            },
        );
        c.bench_function(
            &format!("image-normalize ({lang}): fresh instance (instantiate + init)"),
            |b| b.iter(|| plugin.instantiate_cold().unwrap()),
        );
    }
}

/// What the plugin chain adds in-process, with no network: the same
/// request (`y = 2x` on four floats, the real TorchScript model and its
/// executor) through `Pipeline::infer` with no plugins, and with a router,
/// a pass-through processor before and after the model, and a metrics
/// plugin receiving the request's event. Each configuration runs twice,
/// alternating, so that drift hits both alike.
fn pipeline_chain(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let repo = tempfile::tempdir().unwrap();
    fixtures::scale(repo.path(), "plain", "1", 2.0);
    fixtures::chained(repo.path(), "chained", 2.0);
    let with = tempfile::tempdir().unwrap();
    let without = tempfile::tempdir().unwrap();
    let components = fixtures::CHAIN_PLUGINS;
    for (name, component) in components {
        plinth_tests::install_plugin(with.path(), name, component, None);
    }
    let (plain, chained) = rt.block_on(async {
        let registry = Registry::new(RegistrySettings::new(ModelRepository::new(repo.path()), 1));
        for model in ["plain", "chained"] {
            registry
                .load(model, LoadMode::Load)
                .await
                .unwrap()
                .finished()
                .await
                .unwrap();
        }
        let plugins = Arc::new(PluginHost::new(with.path()));
        for (name, _) in components {
            plugins.load(name).await.unwrap();
        }
        (
            Pipeline::new(
                registry.clone(),
                Arc::new(PluginHost::new(without.path())),
                Default::default(),
            ),
            Pipeline::new(registry, plugins, Default::default()),
        )
    });
    let request = |model: &str| PipelineRequest {
        id: "bench".into(),
        model: model.into(),
        inputs: vec![Tensor::from_f32("x", vec![4], &[1.0, 2.0, 3.0, 4.0]).unwrap()],
        ..PipelineRequest::default()
    };
    // The same answer both ways before anything is timed.
    for (pipeline, model) in [(&plain, "plain"), (&chained, "chained")] {
        let response = rt.block_on(pipeline.infer(request(model))).unwrap();
        assert_eq!(
            response.outputs[0].to_f32().unwrap(),
            [2.0, 4.0, 6.0, 8.0],
            "{model}"
        );
    }
    for round in 1..=2 {
        for (label, pipeline, model) in [
            ("no plugins", &plain, "plain"),
            ("router + pre + post + metrics", &chained, "chained"),
        ] {
            c.bench_function(&format!("Pipeline::infer, {label} (round {round})"), |b| {
                b.iter(|| black_box(rt.block_on(pipeline.infer(request(model))).unwrap()))
            });
        }
    }
}

/// What composing models in an orchestrator costs in-process: the small
/// model of a cascade called directly through `Pipeline::infer`, against
/// the same rows through the `cascade` orchestrator when every row is sure
/// (one nested call) and when none is (two nested calls, the second to the
/// large model). Same models, same rows; alternated twice. Then the same
/// with forward passes inline (`--inline-forward-max-bytes`).
fn orchestration(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let repo = tempfile::tempdir().unwrap();
    fixtures::batched_scale(repo.path(), "small", 1.0);
    fixtures::batched_scale(repo.path(), "large", 4.0);
    fixtures::batched_rows_config()
        .orchestrator("cascade")
        .write(repo.path(), "cascade");
    let dir = tempfile::tempdir().unwrap();
    plinth_tests::install_plugin(
        dir.path(),
        "cascade",
        "cascade",
        Some("[config]\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 0.6\n"),
    );
    let start = |inline_forward_max_bytes: usize| {
        rt.block_on(async {
            let registry = Registry::new(RegistrySettings {
                inline_forward_max_bytes,
                ..RegistrySettings::new(ModelRepository::new(repo.path()), 1)
            });
            for model in ["small", "large", "cascade"] {
                registry
                    .load(model, LoadMode::Load)
                    .await
                    .unwrap()
                    .finished()
                    .await
                    .unwrap();
            }
            let plugins = Arc::new(PluginHost::new(dir.path()));
            plugins.load("cascade").await.unwrap();
            Pipeline::new(registry, plugins, Default::default())
        })
    };
    let sure = [0.75f32, 0.125, 0.125, 0.875, 0.0625, 0.0625];
    let unsure = [0.5f32, 0.25, 0.25, 0.25, 0.25, 0.5];
    let request = |model: &str, rows: &[f32]| PipelineRequest {
        id: "bench".into(),
        model: model.into(),
        inputs: vec![Tensor::from_f32("x", vec![2, 3], rows).unwrap()],
        ..PipelineRequest::default()
    };
    for (setting, inline) in [("", 0), (", inline", 65536)] {
        let pipeline = start(inline);
        let answer = |model: &str, rows: &[f32]| {
            rt.block_on(pipeline.infer(request(model, rows)))
                .unwrap()
                .outputs[0]
                .to_f32()
                .unwrap()
        };
        // The answers the cases stand for, before anything is timed.
        assert_eq!(answer("small", &sure), sure);
        assert_eq!(answer("cascade", &sure), sure);
        assert_eq!(
            answer("cascade", &unsure),
            unsure.iter().map(|v| v * 4.0).collect::<Vec<_>>()
        );
        for round in 1..=2 {
            for (label, model, rows) in [
                ("small model, direct", "small", &sure),
                ("cascade, rows sure (1 nested call)", "cascade", &sure),
                ("cascade, rows unsure (2 nested calls)", "cascade", &unsure),
            ] {
                c.bench_function(
                    &format!("Pipeline::infer{setting}, {label} (round {round})"),
                    |b| {
                        b.iter(|| {
                            black_box(rt.block_on(pipeline.infer(request(model, rows))).unwrap())
                        })
                    },
                );
            }
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = calls, python_beside_rust, pipeline_chain, orchestration
}
criterion_main!(benches);
