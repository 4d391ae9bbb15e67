//! Captures the version of the libtorch this crate is built against (from its
//! headers), and gives this crate's own test binaries an rpath into it.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from);
    if let Some(lib) = libtorch.as_ref().map(|dir| dir.join("lib")) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    let version = libtorch.as_deref().and_then(header_version);
    if version.is_none() {
        println!(
            "cargo:warning=no libtorch version.h under $LIBTORCH; GetInfo will report the libtorch version as unknown"
        );
    }
    println!(
        "cargo:rustc-env=PLINTH_LIBTORCH_VERSION={}",
        version.as_deref().unwrap_or("unknown")
    );
}

/// `MAJOR.MINOR.PATCH` from the `TORCH_VERSION_*` defines of libtorch's headers.
fn header_version(libtorch: &Path) -> Option<String> {
    const HEADERS: [&str; 2] = [
        "include/torch/headeronly/version.h",
        "include/torch/csrc/api/include/torch/version.h",
    ];
    HEADERS.iter().find_map(|rel| {
        let path = libtorch.join(rel);
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read_to_string(&path).ok()?;
        let define = |name: &str| -> Option<u32> {
            text.lines().find_map(|line| {
                let rest = line.trim().strip_prefix("#define ")?.strip_prefix(name)?;
                rest.trim().parse().ok()
            })
        };
        Some(format!(
            "{}.{}.{}",
            define("TORCH_VERSION_MAJOR")?,
            define("TORCH_VERSION_MINOR")?,
            define("TORCH_VERSION_PATCH")?
        ))
    })
}
