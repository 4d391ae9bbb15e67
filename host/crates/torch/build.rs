//! Captures the version of the libtorch this crate is built against (from its
//! headers), gives this crate's own test binaries an rpath into it, and
//! compiles the C++ shim over libtorch's AOTInductor package loader
//! (`shim/aoti.cpp`) against the same headers.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from);
    if let Some(lib) = libtorch.as_ref().map(|dir| dir.join("lib")) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    match libtorch.as_deref() {
        Some(root) => compile_shim(root),
        None => panic!(
            "LIBTORCH is not set: plinth-torch compiles its AOTInductor shim against libtorch's headers (run builds through `cargo xtask`, or `cargo xtask libtorch` and export LIBTORCH)"
        ),
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

/// Compiles `shim/aoti.cpp` into a static library linked into this crate.
/// libtorch itself is linked by `torch-sys`.
fn compile_shim(libtorch: &Path) {
    println!("cargo:rerun-if-changed=shim/aoti.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        // The PyPI wheels since torch 2.7 use the C++11 string ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers warn about themselves; the shim's own code is
        // checked by its few lines being read.
        .warnings(false)
        .file("shim/aoti.cpp")
        .compile("plinth_aoti_shim");
}
