//! `cargo xtask invariants`: the architecture invariants that neither the
//! compiler nor a test can check, checked by reading the tree. ARCHITECTURE.md
//! names this task next to each invariant it covers. Run by `.ci/run`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// One rule: files under `roots` (relative to the repository root) whose
/// text matches `forbidden`, except those under `allowed`, break it.
struct Rule {
    invariant: &'static str,
    roots: &'static [&'static str],
    allowed: &'static [&'static str],
    forbidden: fn(&str) -> bool,
}

/// A word that starts at `at` in `line`: not preceded by an identifier character.
fn word_at(line: &str, at: usize) -> bool {
    line[..at]
        .chars()
        .next_back()
        .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
}

fn mentions(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| word_at(line, at))
}

/// Code lines only: comments and doc comments may name anything.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
}

const RULES: &[Rule] = &[
    Rule {
        invariant: "only the torch layer (host/crates/torch) names tch",
        roots: &["host/src", "host/crates"],
        allowed: &["host/crates/torch"],
        forbidden: |text| {
            code_lines(text).any(|line| mentions(line, "tch::") || mentions(line, "use tch"))
        },
    },
    Rule {
        invariant: "only grpc/ (the server's edge) and plinth-client (the client's) name proto types",
        roots: &["host/src", "host/crates"],
        // plinth-proto defines them. Which crates may depend on it is a
        // crate edge (PROTO_USERS).
        allowed: &["host/src/grpc", "host/crates/client", "host/crates/proto"],
        forbidden: |text| {
            code_lines(text).any(|line| mentions(line, "pb::") || mentions(line, "ipb::"))
        },
    },
    Rule {
        invariant: "only http/ parses JSON request bodies (plinth-client parses its own command line, plinth-torch the metadata file inside a .pt2 package)",
        roots: &["host/src", "host/crates"],
        allowed: &[
            "host/src/http",
            "host/crates/client",
            "host/crates/torch/src/package/info.rs",
        ],
        forbidden: |text| code_lines(text).any(|line| line.contains("serde_json::from_")),
    },
    Rule {
        invariant: "every port is served by listen::serve (its TLS, limits and peer address), never by a server of its own",
        roots: &["host/src"],
        allowed: &["host/src/listen.rs"],
        forbidden: |text| {
            code_lines(text).any(|line| {
                line.contains("axum::serve(")
                    || line.contains("Server::builder()")
                    || line.contains("serve_connection")
                    || line.contains("TlsAcceptor")
            })
        },
    },
    Rule {
        invariant: "no wait in the tests is unbounded: every poll loop is `eventually`",
        roots: &["tests/tests", "tests/src", "host/tests"],
        // The helper itself (its copy for the binary's own tests,
        // host/tests/common, needs no `loop`).
        allowed: &["tests/src/eventually.rs"],
        forbidden: |text| code_lines(text).any(|line| line.trim() == "loop {"),
    },
    Rule {
        invariant: "tests assert behaviour, never wall-clock bounds",
        roots: &["tests/tests", "host/tests", "host/src", "host/crates"],
        allowed: &[],
        forbidden: |text| {
            code_lines(text).any(|line| line.contains("assert") && line.contains(".elapsed()"))
        },
    },
];

/// One crate of the host and the edges it may have: the crates named
/// `plinth` or `plinth-*` and the [`HEAVY_EXTERNALS`] its `[dependencies]`
/// may name. Any other such dependency breaks the layering; dependencies
/// outside those two kinds are not checked.
struct Layer {
    manifest: &'static str,
    package: &'static str,
    may_depend_on: &'static [&'static str],
}

/// Externals whose place in the layering matters: libtorch's bindings, the
/// WebAssembly runtime, the gRPC stack and the HTTP server. Which crate may
/// depend on each is part of [`LAYERS`].
const HEAVY_EXTERNALS: &[&str] = &[
    "tch",
    "torch-sys",
    "wasmtime",
    "wasmtime-wasi",
    "wasmtime-wasi-io",
    "tonic",
    "tonic-health",
    "tonic-prost",
    "tonic-reflection",
    "prost",
    "axum",
    "hyper",
    "hyper-util",
];

/// The layering as crate edges: every crate under host/, with the
/// `plinth-*` crates and the heavy externals it may depend on. A crate
/// under host/crates that is missing here is a failure too, so a new crate
/// states its edges when it is added.
const LAYERS: &[Layer] = &[
    Layer {
        manifest: "host/crates/core/Cargo.toml",
        package: "plinth-core",
        may_depend_on: &[],
    },
    Layer {
        manifest: "host/crates/watch/Cargo.toml",
        package: "plinth-watch",
        may_depend_on: &[],
    },
    Layer {
        manifest: "host/crates/torch/Cargo.toml",
        package: "plinth-torch",
        may_depend_on: &["plinth-core", "tch"],
    },
    Layer {
        manifest: "host/crates/plugin/Cargo.toml",
        package: "plinth-plugin",
        may_depend_on: &[
            "plinth-core",
            "plinth-watch",
            "wasmtime",
            "wasmtime-wasi",
            "wasmtime-wasi-io",
        ],
    },
    Layer {
        manifest: "host/crates/proto/Cargo.toml",
        package: "plinth-proto",
        may_depend_on: &["prost", "tonic", "tonic-prost"],
    },
    Layer {
        manifest: "host/crates/client/Cargo.toml",
        package: "plinth-client",
        // The plugin layer for `plinth plugin check`, which runs the
        // loader's own checks; never the server.
        may_depend_on: &["plinth-proto", "plinth-plugin", "tonic", "tonic-health"],
    },
    Layer {
        manifest: "host/Cargo.toml",
        package: "plinth",
        // tch and wasmtime only through their layers. plinth-client is the
        // binary's: Cargo gives a package's library and binary one list.
        may_depend_on: &[
            "plinth-core",
            "plinth-torch",
            "plinth-plugin",
            "plinth-watch",
            "plinth-proto",
            "plinth-client",
            "tonic",
            "tonic-health",
            "tonic-reflection",
            "prost",
            "axum",
            "hyper",
            "hyper-util",
        ],
    },
];

/// The crates that may depend on `plinth-proto`: the server, in which only
/// grpc/ names proto types (a file rule above), and the client. Checked on
/// its own, so widening [`LAYERS`] cannot widen it.
const PROTO_USERS: &[&str] = &["plinth", "plinth-client"];

/// Whether the layering governs a dependency on `name`.
fn governed(name: &str) -> bool {
    name == "plinth" || name.starts_with("plinth-") || HEAVY_EXTERNALS.contains(&name)
}

/// The package names a manifest depends on in `[dependencies]`, its
/// platform-specific ones included, with renames (`package = ...`) undone.
fn dependencies(manifest: &str) -> Result<Vec<String>> {
    let table: toml::Table = manifest.parse()?;
    let mut tables: Vec<&toml::Table> = table
        .get("dependencies")
        .and_then(toml::Value::as_table)
        .into_iter()
        .collect();
    if let Some(targets) = table.get("target").and_then(toml::Value::as_table) {
        tables.extend(
            targets
                .values()
                .filter_map(|target| target.get("dependencies")?.as_table()),
        );
    }
    let mut names = Vec::new();
    for deps in tables {
        for (key, spec) in deps {
            let package = spec.get("package").and_then(toml::Value::as_str);
            names.push(package.unwrap_or(key).to_owned());
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// What is wrong with `layer` depending on `deps`: one line per edge it
/// may not have.
fn broken_edges(layer: &Layer, deps: &[String]) -> Vec<String> {
    let mut broken = Vec::new();
    for dep in deps.iter().filter(|dep| governed(dep)) {
        if dep == "plinth-proto" && !PROTO_USERS.contains(&layer.package) {
            broken.push(format!(
                "{}: depends on plinth-proto, but only {} may (only grpc/ and the client name proto types)",
                layer.manifest,
                PROTO_USERS.join(" and ")
            ));
        } else if !layer.may_depend_on.contains(&dep.as_str()) {
            broken.push(format!(
                "{}: depends on {dep}, which is not on {}'s list of allowed dependencies",
                layer.manifest, layer.package
            ));
        }
    }
    broken
}

/// Every crate under host/: host/Cargo.toml and host/crates/*/Cargo.toml.
/// The source folders of the crates under host/: `host/src` and each
/// `host/crates/*/src`.
pub(crate) fn host_sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut sources = vec![root.join("host/src")];
    for entry in std::fs::read_dir(root.join("host/crates"))? {
        let src = entry?.path().join("src");
        if src.is_dir() {
            sources.push(src);
        }
    }
    sources.sort();
    Ok(sources)
}

fn host_manifests(root: &Path) -> Result<Vec<String>> {
    let mut manifests = vec!["host/Cargo.toml".to_owned()];
    for entry in std::fs::read_dir(root.join("host/crates"))? {
        let dir = entry?.path();
        if dir.join("Cargo.toml").is_file() {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            manifests.push(format!("host/crates/{name}/Cargo.toml"));
        }
    }
    manifests.sort();
    Ok(manifests)
}

pub(crate) fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if dir.is_file() {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

pub fn check(root: &Path) -> Result<()> {
    let mut broken = Vec::new();
    for rule in RULES {
        let mut files = Vec::new();
        for dir in rule.roots {
            rust_files(&root.join(dir), &mut files)?;
        }
        for file in files {
            let rel = file.strip_prefix(root).unwrap_or(&file);
            if rule.allowed.iter().any(|allowed| rel.starts_with(allowed)) {
                continue;
            }
            if (rule.forbidden)(&std::fs::read_to_string(&file)?) {
                broken.push(format!("{}: breaks \"{}\"", rel.display(), rule.invariant));
            }
        }
    }
    for manifest in host_manifests(root)? {
        if !LAYERS.iter().any(|layer| layer.manifest == manifest) {
            broken.push(format!(
                "{manifest}: a crate with no entry in LAYERS (xtask/src/invariants.rs): list what it may depend on"
            ));
        }
    }
    for layer in LAYERS {
        let text = std::fs::read_to_string(root.join(layer.manifest))?;
        let package = text
            .parse::<toml::Table>()?
            .get("package")
            .and_then(|package| package.get("name")?.as_str().map(str::to_owned));
        if package.as_deref() != Some(layer.package) {
            broken.push(format!(
                "{}: expected the package {}, found {}",
                layer.manifest,
                layer.package,
                package.as_deref().unwrap_or("none")
            ));
        }
        broken.extend(broken_edges(layer, &dependencies(&text)?));
    }
    let sources = host_sources(root)?;
    for src in &sources {
        for cycle in crate::cycles::cycles(root, src)? {
            broken.push(format!(
                "files import each other in a circle: {}",
                cycle.join(" -> ")
            ));
        }
    }
    if !broken.is_empty() {
        bail!("architecture invariants broken:\n  {}", broken.join("\n  "));
    }
    println!(
        "xtask: {} file rules and {} crate-edge rules hold; the files of {} crates under host/ import each other in no circle",
        RULES.len(),
        LAYERS.len(),
        sources.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_matched_whole_and_comments_are_skipped() {
        assert!(mentions("use tch::Tensor;", "tch::"));
        assert!(!mentions("use crate::batch::BatchPolicy;", "tch::"));
        assert!(mentions("let x: pb::Tensor;", "pb::"));
        assert!(!mentions("let x: ipb::Tensor;", "pb::"));
        assert_eq!(code_lines("// tch::Tensor\nlet a = 1;").count(), 1);
    }

    fn layer(package: &'static str) -> &'static Layer {
        LAYERS
            .iter()
            .find(|layer| layer.package == package)
            .unwrap()
    }

    fn names(deps: &[&str]) -> Vec<String> {
        deps.iter().map(|dep| (*dep).to_owned()).collect()
    }

    #[test]
    fn dependencies_are_read_by_package_name() {
        let manifest = r#"
            [package]
            name = "x"
            [dependencies]
            serde.workspace = true
            core = { package = "plinth-core", path = "../core" }
            [target.'cfg(unix)'.dependencies]
            tch = "0.24"
            [dev-dependencies]
            wasmtime = "48"
            [build-dependencies]
            tonic-prost-build = "0.14"
        "#;
        assert_eq!(
            dependencies(manifest).unwrap(),
            ["plinth-core", "serde", "tch"]
        );
    }

    #[test]
    fn an_edge_off_the_list_is_broken_and_others_are_not_checked() {
        let torch = layer("plinth-torch");
        assert!(broken_edges(torch, &names(&["plinth-core", "tch", "tokio", "zip"])).is_empty());
        let broken = broken_edges(torch, &names(&["plinth-plugin", "wasmtime", "axum"]));
        assert_eq!(broken.len(), 3, "{broken:?}");
        assert!(broken[0].contains("depends on plinth-plugin"), "{broken:?}");
        // A dependency on the server crate itself is governed too.
        assert_eq!(
            broken_edges(layer("plinth-client"), &names(&["plinth"])).len(),
            1
        );
    }

    #[test]
    fn only_the_server_and_the_client_may_depend_on_the_protocol() {
        for layer in LAYERS {
            let allowed = layer.may_depend_on.contains(&"plinth-proto");
            assert_eq!(
                allowed,
                PROTO_USERS.contains(&layer.package),
                "{}",
                layer.package
            );
        }
        // Even a crate whose list were widened by mistake is refused.
        let widened = Layer {
            manifest: "host/crates/core/Cargo.toml",
            package: "plinth-core",
            may_depend_on: &["plinth-proto"],
        };
        let broken = broken_edges(&widened, &names(&["plinth-proto"]));
        assert!(
            broken[0].contains("only grpc/ and the client"),
            "{broken:?}"
        );
    }

    #[test]
    fn the_server_reaches_torch_and_wasmtime_only_through_their_layers() {
        let host = layer("plinth");
        for heavy in ["tch", "torch-sys", "wasmtime", "wasmtime-wasi"] {
            assert!(!host.may_depend_on.contains(&heavy), "{heavy}");
        }
        let client = layer("plinth-client");
        assert!(!client.may_depend_on.contains(&"plinth"));
        // Every name on a list is one the check governs: no dead entries.
        for layer in LAYERS {
            for dep in layer.may_depend_on {
                assert!(governed(dep), "{}: {dep}", layer.package);
            }
        }
    }

    #[test]
    fn the_tree_keeps_its_invariants() {
        check(&crate::project_root()).unwrap();
    }
}
