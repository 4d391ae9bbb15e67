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
        invariant: "only grpc/ (the server's edge) and cli/ (the client's) name proto types",
        roots: &["host/src", "host/crates"],
        allowed: &["host/src/grpc", "host/src/cli"],
        forbidden: |text| {
            code_lines(text).any(|line| mentions(line, "pb::") || mentions(line, "ipb::"))
        },
    },
    Rule {
        invariant: "only http/ parses JSON request bodies (cli/ parses its own command line)",
        roots: &["host/src", "host/crates"],
        allowed: &["host/src/http", "host/src/cli"],
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

/// Cargo dependencies a layer must not have: the layering as crate edges.
const FORBIDDEN_DEPENDENCIES: &[(&str, &[&str])] = &[
    (
        "host/crates/core/Cargo.toml",
        &[
            "tch",
            "wasmtime",
            "plinth-torch",
            "plinth-plugin",
            "tonic",
            "axum",
        ],
    ),
    (
        "host/crates/torch/Cargo.toml",
        &["wasmtime", "plinth-plugin", "tonic", "axum"],
    ),
    (
        "host/crates/plugin/Cargo.toml",
        &["tch", "plinth-torch", "tonic", "axum"],
    ),
    (
        "host/crates/watch/Cargo.toml",
        &[
            "tch",
            "wasmtime",
            "plinth-core",
            "plinth-torch",
            "plinth-plugin",
            "tonic",
            "axum",
        ],
    ),
    ("host/Cargo.toml", &["tch", "wasmtime"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
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
    for (manifest, forbidden) in FORBIDDEN_DEPENDENCIES {
        let text = std::fs::read_to_string(root.join(manifest))?;
        let table: toml::Table = text.parse()?;
        let deps = table
            .get("dependencies")
            .and_then(toml::Value::as_table)
            .map(|deps| deps.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for dep in deps.iter().filter(|dep| forbidden.contains(&dep.as_str())) {
            broken.push(format!(
                "{manifest}: depends on {dep}, which its layer must not"
            ));
        }
    }
    if !broken.is_empty() {
        bail!("architecture invariants broken:\n  {}", broken.join("\n  "));
    }
    println!(
        "xtask: {} file rules and {} crate-edge rules hold",
        RULES.len(),
        FORBIDDEN_DEPENDENCIES.len()
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

    #[test]
    fn the_tree_keeps_its_invariants() {
        check(&crate::project_root()).unwrap();
    }
}
