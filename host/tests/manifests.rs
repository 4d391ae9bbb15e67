//! The manifests in deploy/ loaded into typed models: every object through
//! the `kubernetes` package's models (Kubernetes' own kinds) or the
//! `kserve` package's (ServingRuntime, ClusterServingRuntime,
//! InferenceService), refusing any field the model does not have, then the
//! probes, ports and security contexts held to the rules. The work is done
//! by tests/python/check_manifests.py in the venv `cargo xtask test`
//! provides (PLINTH_PYTHON); deploy.rs checks the same manifests against
//! the binary itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the checker over `dirs`, from the repository root.
fn check_manifests(dirs: &[&Path]) -> Output {
    let python = std::env::var_os("PLINTH_PYTHON").expect(
        "PLINTH_PYTHON is not set: run the suite with `cargo xtask test`, which installs kubernetes and kserve into a venv",
    );
    let root = repo_root();
    Command::new(&python)
        .arg(root.join("tests/python/check_manifests.py"))
        .args(dirs)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("running {python:?}: {e}"))
}

/// What the checker printed, both streams.
fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn every_manifest_loads_into_its_typed_model_and_keeps_the_rules() {
    let root = repo_root();
    let output = check_manifests(&[&root.join("deploy/kubernetes"), &root.join("deploy/kserve")]);
    let text = printed(&output);
    assert!(
        output.status.success(),
        "check_manifests.py found problems ({}):\n{text}",
        output.status
    );
    // Something was checked: the Deployment and the KServe runtime at least.
    assert!(text.contains("Deployment/plinth"), "{text}");
    assert!(text.contains("ClusterServingRuntime/plinth"), "{text}");
}

/// The check can fail: a misspelt field, which the packages' own
/// deserializers would drop without a word, is refused and named by its path.
#[test]
fn an_unknown_field_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("typo.yaml"),
        "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: typo
spec:
  selector:
    matchLabels:
      app: typo
  template:
    metadata:
      labels:
        app: typo
    spec:
      containers:
        - name: plinth
          image: plinth:0.1.0
          imagePullPolcy: Always
",
    )
    .unwrap();
    let output = check_manifests(&[dir.path()]);
    let text = printed(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "typo.yaml: Deployment/typo: spec.template.spec.containers[0].imagePullPolcy: unknown field"
        ),
        "the unknown field is not named with its file, object and path:\n{text}"
    );
}
