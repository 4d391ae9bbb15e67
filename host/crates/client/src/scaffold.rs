//! `plinth plugin new` and `plinth plugin build`: a plugin project that
//! builds as it is, in Rust (a crate on `plugin-sdk`) or Python (an `app.py`
//! for componentize-py), and the command that turns it into a component.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{CliError, CliResult, fail};

/// The componentize-py release Python plugins are built with; `cargo xtask
/// plugins` installs the same one into the same cache.
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// The WIT this binary's host accepts, for Python projects (componentize-py
/// generates their bindings from it at build time).
const WIT: &[(&str, &str)] = &[
    ("types.wit", include_str!("../../../../wit/types.wit")),
    ("host.wit", include_str!("../../../../wit/host.wit")),
    ("router.wit", include_str!("../../../../wit/router.wit")),
    (
        "processor.wit",
        include_str!("../../../../wit/processor.wit"),
    ),
    ("metrics.wit", include_str!("../../../../wit/metrics.wit")),
    ("health.wit", include_str!("../../../../wit/health.wit")),
    (
        "orchestrator.wit",
        include_str!("../../../../wit/orchestrator.wit"),
    ),
    ("context.wit", include_str!("../../../../wit/context.wit")),
    ("worlds.wit", include_str!("../../../../wit/worlds.wit")),
];

const RUST_CARGO: &str = include_str!("templates/rust/Cargo.toml.tmpl");
const RUST_GITIGNORE: &str = include_str!("templates/rust/gitignore.tmpl");
const MANIFEST: &str = include_str!("templates/manifest.toml.tmpl");
const PY_COMMON: &str = include_str!("templates/python/common_head.py.tmpl");
const PY_BUILD: &str = include_str!("templates/python/build.sh.tmpl");
const PY_PROJECT: &str = include_str!("templates/python/pyproject.toml.tmpl");
const PY_GITIGNORE: &str = include_str!("templates/python/gitignore.tmpl");

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Router,
    Processor,
    Metrics,
    Health,
    /// Served as a model; calls other models (Rust only).
    Orchestrator,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Processor => "processor",
            Kind::Metrics => "metrics",
            Kind::Health => "health",
            Kind::Orchestrator => "orchestrator",
        }
    }

    fn world(self) -> String {
        format!("{}-plugin", self.name())
    }

    fn rust_source(self) -> &'static str {
        match self {
            Kind::Router => include_str!("templates/rust/router.rs.tmpl"),
            Kind::Processor => include_str!("templates/rust/processor.rs.tmpl"),
            Kind::Metrics => include_str!("templates/rust/metrics.rs.tmpl"),
            Kind::Health => include_str!("templates/rust/health.rs.tmpl"),
            Kind::Orchestrator => include_str!("templates/rust/orchestrator.rs.tmpl"),
        }
    }

    fn python_source(self) -> &'static str {
        match self {
            Kind::Router => include_str!("templates/python/router.py.tmpl"),
            Kind::Processor => include_str!("templates/python/processor.py.tmpl"),
            Kind::Metrics => include_str!("templates/python/metrics.py.tmpl"),
            Kind::Health => include_str!("templates/python/health.py.tmpl"),
            // `new` refuses it before a source is asked for.
            Kind::Orchestrator => "",
        }
    }

    /// The `[config]` lines of the new manifest: the keys the template reads.
    fn config(self) -> &'static str {
        match self {
            Kind::Router => "header = \"route-to\"",
            Kind::Processor => "factor = 1.0",
            Kind::Metrics => "# (this template reads no keys)",
            Kind::Health => "min-ready = 1",
            Kind::Orchestrator => {
                "model = \"my-model\"   # the model each request goes to\n# then = \"my-head\"  # optional: a second model its outputs go to\n# then-input = \"x\"  # optional: renames a single output to its input"
            }
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Lang {
    #[default]
    Rust,
    Python,
}

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// What the plugin does: which WIT world it implements.
    pub kind: Kind,
    /// The plugin's name: lowercase letters, digits and '-', starting with
    /// a letter. It names the crate or package and the built `NAME.wasm`.
    pub name: String,
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    pub lang: Lang,
    /// Where to create the project (default: ./NAME). Must not exist, or be
    /// an empty directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `plugin-sdk` directory a Rust project depends on (default: the
    /// one in the checkout this binary was built from).
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The project directory (default: the current one).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Where to put NAME.wasm and its manifest NAME.toml (default: DIR/dist).
    /// Both are written atomically, so this may be a live plugin directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A plugin name that is a crate name, a Python package name and a plugin
/// file stem alike.
fn check_name(name: &str) -> CliResult {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        fail(format!(
            "plugin name `{name}`: expected lowercase letters, digits and '-', starting with a letter (at most 64)"
        ))
    }
}

/// `my-scale` → `MyScale`.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

struct Project {
    name: String,
    kind: Kind,
    lang: Lang,
    sdk: String,
}

impl Project {
    fn fill(&self, template: &str) -> String {
        let description = format!(
            "A Plinth {} plugin{}",
            self.kind.name(),
            if self.lang == Lang::Python {
                " in Python"
            } else {
                ""
            }
        );
        let (deadline_ms, memory_mib) = match self.lang {
            Lang::Rust => ("50", "64"),
            // CPython's heap and its first calls: see the README.
            Lang::Python => ("200", "256"),
        };
        template
            .replace("{{common}}", PY_COMMON.trim_end())
            .replace("{{name}}", &self.name)
            .replace("{{Type}}", &type_name(&self.name))
            .replace("{{metric}}", &self.name.replace('-', "_"))
            .replace("{{world}}", &self.kind.world())
            .replace("{{sdk}}", &self.sdk)
            .replace("{{description_toml}}", &toml_string(&description))
            .replace("{{description}}", &description)
            .replace("{{cpy_version}}", COMPONENTIZE_PY_VERSION)
            .replace("{{config}}", self.kind.config())
            .replace("{{deadline_ms}}", deadline_ms)
            .replace("{{memory_mib}}", memory_mib)
    }
}

/// `plinth plugin new KIND NAME`.
pub fn new(args: NewArgs) -> CliResult {
    check_name(&args.name)?;
    if args.kind == Kind::Orchestrator && args.lang == Lang::Python {
        return fail(
            "orchestrator plugins are Rust only for now: the Python template has no `models` bindings yet (drop --lang python)",
        );
    }
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(true)
    {
        return fail(format!(
            "{}: exists and is not an empty directory",
            dir.display()
        ));
    }
    let sdk = match args.lang {
        Lang::Python => String::new(),
        Lang::Rust => {
            let sdk = args.sdk.unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../plugin-sdk")
            });
            let sdk = sdk
                .canonicalize()
                .ok()
                .filter(|p| p.join("Cargo.toml").is_file());
            let Some(sdk) = sdk else {
                return fail(
                    "no plugin-sdk found where this binary was built: pass --sdk PATH, the plugin-sdk directory of a Plinth checkout",
                );
            };
            toml_string(&sdk.to_string_lossy())
        }
    };
    let project = Project {
        name: args.name.clone(),
        kind: args.kind,
        lang: args.lang,
        sdk,
    };
    let mut files: Vec<(PathBuf, String)> = vec![(
        PathBuf::from(format!("{}.toml", project.name)),
        project.fill(MANIFEST),
    )];
    match args.lang {
        Lang::Rust => {
            files.push(("Cargo.toml".into(), project.fill(RUST_CARGO)));
            files.push((".gitignore".into(), RUST_GITIGNORE.to_owned()));
            files.push(("src/lib.rs".into(), project.fill(args.kind.rust_source())));
        }
        Lang::Python => {
            files.push(("app.py".into(), project.fill(args.kind.python_source())));
            files.push(("pyproject.toml".into(), project.fill(PY_PROJECT)));
            files.push(("build.sh".into(), project.fill(PY_BUILD)));
            files.push((".gitignore".into(), PY_GITIGNORE.to_owned()));
            for (file, text) in WIT {
                files.push((Path::new("wit").join(file), (*text).to_owned()));
            }
        }
    }
    for (file, text) in &files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|err| io_error(parent, err))?;
        }
        std::fs::write(&path, text).map_err(|err| io_error(&path, err))?;
    }
    if args.lang == Lang::Python {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("build.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(|err| io_error(&script, err))?;
    }
    let lang = match args.lang {
        Lang::Rust => "Rust",
        Lang::Python => "Python",
    };
    println!(
        "created {} `{}` ({lang}) in {}",
        args.kind.name(),
        project.name,
        dir.display()
    );
    println!("next:");
    if args.lang == Lang::Rust {
        println!(
            "  cd {} && cargo test                      # its unit tests, on this machine",
            dir.display()
        );
    }
    println!(
        "  plinth plugin build {} --out PLUGIN_DIR   # {}.wasm and {}.toml into a server's plugin directory",
        dir.display(),
        project.name,
        project.name
    );
    Ok(())
}

fn io_error(path: &Path, err: std::io::Error) -> CliError {
    CliError(format!("{}: {err}", path.display()))
}

/// `plinth plugin build [DIR]`.
pub fn build(args: BuildArgs) -> CliResult {
    let dir = &args
        .dir
        .canonicalize()
        .map_err(|err| io_error(&args.dir, err))?;
    let out = args.out.clone().unwrap_or_else(|| dir.join("dist"));
    std::fs::create_dir_all(&out).map_err(|err| io_error(&out, err))?;
    let out = out.canonicalize().map_err(|err| io_error(&out, err))?;
    let (name, built) = if dir.join("Cargo.toml").is_file() {
        build_rust(dir)?
    } else if dir.join("pyproject.toml").is_file() {
        build_python(dir, &out)?
    } else {
        return fail(format!(
            "{}: not a plugin project (no Cargo.toml or pyproject.toml); create one with `plinth plugin new`",
            dir.display()
        ));
    };
    // The manifest first: a watcher that sees the component finds its
    // manifest already there.
    let manifest = dir.join(format!("{name}.toml"));
    if manifest.is_file() {
        let text = std::fs::read(&manifest).map_err(|err| io_error(&manifest, err))?;
        install(&out, &format!("{name}.toml"), &text)?;
    }
    let bytes = std::fs::read(&built).map_err(|err| io_error(&built, err))?;
    let target = install(&out, &format!("{name}.wasm"), &bytes)?;
    if built.starts_with(&out) {
        let _ = std::fs::remove_file(&built);
    }
    println!(
        "built {} ({} KiB); check it with `plinth plugin check {}`",
        target.display(),
        bytes.len() / 1024,
        target.display()
    );
    Ok(())
}

/// Writes `out/file` through a hidden staging file and a rename.
fn install(out: &Path, file: &str, bytes: &[u8]) -> CliResult<PathBuf> {
    let staging = out.join(format!(".{file}.partial"));
    let target = out.join(file);
    std::fs::write(&staging, bytes).map_err(|err| io_error(&staging, err))?;
    std::fs::rename(&staging, &target).map_err(|err| io_error(&target, err))?;
    Ok(target)
}

fn table(path: &Path) -> CliResult<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|err| io_error(path, err))?;
    text.parse::<toml::Table>()
        .map_err(|err| CliError(format!("{}: {err}", path.display())))
}

/// The name at `key` of a TOML table (`package.name`, `project.name`).
fn string_at<'a>(table: &'a toml::Table, path: &Path, keys: &[&str]) -> CliResult<&'a str> {
    let mut value: Option<&toml::Value> = None;
    for key in keys {
        value = match value {
            None => table.get(*key),
            Some(v) => v.get(*key),
        };
    }
    value.and_then(|v| v.as_str()).ok_or_else(|| {
        CliError(format!(
            "{}: no string at `{}`",
            path.display(),
            keys.join(".")
        ))
    })
}

fn build_rust(dir: &Path) -> CliResult<(String, PathBuf)> {
    let cargo_toml = dir.join("Cargo.toml");
    let name = string_at(&table(&cargo_toml)?, &cargo_toml, &["package", "name"])?.to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The target's standard library must be there; cargo's own error for
    // a missing one is a page of `can't find crate for core`.
    let libdir = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output();
    let installed = libdir.as_ref().is_ok_and(|o| {
        o.status.success() && Path::new(String::from_utf8_lossy(&o.stdout).trim()).is_dir()
    });
    if !installed {
        return fail(
            "the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`",
        );
    }
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--message-format",
        "json-render-diagnostics",
    ])
    .arg("--manifest-path")
    .arg(&cargo_toml)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let output = cmd
        .output()
        .map_err(|err| CliError(format!("running cargo: {err}")))?;
    if !output.status.success() {
        return fail(format!("cargo build of {} failed (above)", dir.display()));
    }
    // The cdylib's .wasm, from cargo's artifact messages.
    let artifact = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == name.replace('-', "_").as_str()
                && m["target"]["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"))
        })
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .collect::<Vec<_>>()
        })
        .find(|f| f.extension().is_some_and(|e| e == "wasm"));
    match artifact {
        Some(path) => Ok((name, path)),
        None => fail(format!(
            "cargo built {} but named no .wasm: is `crate-type = [\"cdylib\"]` in its [lib]?",
            dir.display()
        )),
    }
}

fn build_python(dir: &Path, out: &Path) -> CliResult<(String, PathBuf)> {
    let pyproject = dir.join("pyproject.toml");
    let project = table(&pyproject)?;
    let name = string_at(&project, &pyproject, &["project", "name"])?.to_owned();
    let world = string_at(&project, &pyproject, &["tool", "plinth", "world"])?.to_owned();
    // `[tool.plinth] wit` may point at another WIT directory (the
    // examples in plugins/ use the repository's).
    let wit = match string_at(&project, &pyproject, &["tool", "plinth", "wit"]) {
        Ok(path) => dir.join(path),
        Err(_) => dir.join("wit"),
    };
    if !dir.join("app.py").is_file() {
        return fail(format!("{}: no app.py", dir.display()));
    }
    let tool = componentize_py()?;
    let built = out.join(format!(".{name}.wasm.build"));
    let status = Command::new(&tool)
        .arg("-d")
        .arg(&wit)
        .args(["-w", &world, "componentize", "-p"])
        .arg(dir)
        .args(["app", "-o"])
        .arg(&built)
        .current_dir(dir)
        // Its errors are Python's and the WIT's; its own backtrace is noise.
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .status()
        .map_err(|err| CliError(format!("running {}: {err}", tool.display())))?;
    if !status.success() {
        return fail(format!(
            "componentize-py could not build {} (above)",
            dir.display()
        ));
    }
    Ok((name, built))
}

/// Plinth's cache directory: `$PLINTH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/plinth`, else `~/.cache/plinth` (as `cargo xtask`).
fn cache_dir() -> CliResult<PathBuf> {
    if let Some(dir) = std::env::var_os("PLINTH_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("plinth"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache/plinth")),
        None => {
            fail("neither PLINTH_CACHE_DIR nor HOME is set: nowhere to install componentize-py")
        }
    }
}

/// componentize-py: `$PLINTH_COMPONENTIZE_PY`, or the pinned release in a
/// venv of the cache, installed from PyPI on first use.
fn componentize_py() -> CliResult<PathBuf> {
    if let Some(tool) = std::env::var_os("PLINTH_COMPONENTIZE_PY") {
        return Ok(PathBuf::from(tool));
    }
    let venv = cache_dir()?.join(format!("componentize-py-{COMPONENTIZE_PY_VERSION}"));
    let tool = venv.join("bin/componentize-py");
    let wanted = format!("componentize-py=={COMPONENTIZE_PY_VERSION}");
    let stamp = venv.join(".requirements");
    if tool.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(tool);
    }
    eprintln!("plinth: installing {wanted} into {} (once)", venv.display());
    let run = |cmd: &mut Command, what: &str| -> CliResult {
        match cmd.stdout(Stdio::null()).status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => fail(format!("{what} failed ({status})")),
            Err(err) => fail(format!("{what}: {err}")),
        }
    };
    run(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
        "python3 -m venv (Python 3 with venv is needed once, to install componentize-py)",
    )?;
    run(
        Command::new(venv.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &wanted,
        ]),
        &format!("pip install {wanted}"),
    )?;
    std::fs::write(&stamp, wanted).map_err(|err| io_error(&stamp, err))?;
    Ok(tool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_typed() {
        assert!(check_name("scale-2").is_ok());
        for bad in ["", "Scale", "2scale", "scale_x", "scale-", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(type_name("my-scale-2"), "MyScale2");
    }

    /// A Python project carries the whole contract: componentize-py parses
    /// every file of its `wit/`, and `worlds.wit` names them all.
    #[test]
    fn python_projects_get_every_wit_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../wit");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".wit"))
            .collect();
        on_disk.sort();
        let mut copied: Vec<String> = WIT.iter().map(|(name, _)| (*name).to_owned()).collect();
        copied.sort();
        assert_eq!(copied, on_disk);
    }

    #[test]
    fn every_placeholder_is_filled() {
        for lang in [Lang::Rust, Lang::Python] {
            for kind in [
                Kind::Router,
                Kind::Processor,
                Kind::Metrics,
                Kind::Health,
                Kind::Orchestrator,
            ] {
                if kind == Kind::Orchestrator && lang == Lang::Python {
                    continue;
                }
                let project = Project {
                    name: "my-plug".into(),
                    kind,
                    lang,
                    sdk: "\"/sdk\"".into(),
                };
                let source = match lang {
                    Lang::Rust => kind.rust_source(),
                    Lang::Python => kind.python_source(),
                };
                for template in [source, MANIFEST, RUST_CARGO, PY_PROJECT, PY_BUILD] {
                    let text = project.fill(template);
                    for placeholder in [
                        "{{name}}",
                        "{{Type}}",
                        "{{metric}}",
                        "{{world}}",
                        "{{sdk}}",
                        "{{common}}",
                        "{{description}}",
                        "{{description_toml}}",
                        "{{config}}",
                        "{{cpy_version}}",
                        "{{deadline_ms}}",
                        "{{memory_mib}}",
                    ] {
                        assert!(
                            !text.contains(placeholder),
                            "{placeholder} left in {kind:?}/{lang:?}:\n{text}"
                        );
                    }
                }
            }
        }
    }
}
