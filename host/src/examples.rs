//! The example guests (`examples-wasm/*`) as Wasm modules, for tests,
//! benchmarks and demos: builds them with cargo for `wasm32-unknown-unknown`
//! and returns the module paths.
//!
//! It owns nothing at run time: the replica never calls it. It must never build
//! into the outer `target/` directory (an outer `cargo test` holds that lock,
//! so a nested build there would deadlock); it uses `target/guest/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};

/// Every example crate under `examples-wasm/`, in the order documented in ABI.md.
const EXAMPLE_NAMES: &[&str] = &["counter", "kv", "kv_v2", "bank"];

/// The Rust target guests are built for.
pub const GUEST_TARGET: &str = "wasm32-unknown-unknown";

/// The cargo profile for guests (root Cargo.toml): release plus fat LTO, one
/// codegen unit, abort on panic, no debug info.
pub const GUEST_PROFILE: &str = "guest";

/// The names `example_module` accepts: "counter", "kv", "kv_v2", "bank".
pub fn example_names() -> &'static [&'static str] {
    EXAMPLE_NAMES
}

/// The path of the example guest `name`, built as a Wasm module.
///
/// The first call in a process builds all examples in one cargo invocation
/// (`cargo build --profile guest --target wasm32-unknown-unknown
/// --target-dir <workspace>/target/guest -p counter -p kv ...`); later calls
/// reuse that result, so concurrent callers wait for one build. Cargo itself
/// skips the work when nothing changed.
pub fn example_module(name: &str) -> anyhow::Result<PathBuf> {
    if !EXAMPLE_NAMES.contains(&name) {
        bail!("unknown example {name:?}; the examples are {EXAMPLE_NAMES:?}");
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let out_dir = BUILT
        .get_or_init(|| build_examples().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("building the example guests failed: {e}"))?;
    let module = out_dir.join(format!("{name}.wasm"));
    if !module.is_file() {
        bail!(
            "cargo built the examples but {} is missing",
            module.display()
        );
    }
    Ok(module)
}

/// Builds every example; returns the directory holding the `.wasm` files. A fresh
/// machine may lack the wasm32 target: it is installed with rustup (once) so that
/// `paxwasm dev` needs no set-up step of its own.
fn build_examples() -> anyhow::Result<PathBuf> {
    match build_examples_once() {
        Err(error) if error.downcast_ref::<TargetMissing>().is_some() => {
            tracing::info!("installing the Rust target {GUEST_TARGET} with rustup");
            let status = Command::new("rustup")
                .args(["target", "add", GUEST_TARGET])
                .status()
                .with_context(|| format!("{error}; running rustup failed"))?;
            if !status.success() {
                bail!("{error}; `rustup target add {GUEST_TARGET}` failed ({status})");
            }
            build_examples_once()
        }
        result => result,
    }
}

/// The wasm32 target is not installed.
#[derive(Debug)]
struct TargetMissing;

impl std::fmt::Display for TargetMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the Rust target {GUEST_TARGET} is not installed; \
             run `rustup target add {GUEST_TARGET}`"
        )
    }
}

impl std::error::Error for TargetMissing {}

fn build_examples_once() -> anyhow::Result<PathBuf> {
    let workspace = workspace_dir()?;
    let target_dir = workspace.join("target").join("guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(&workspace)
        .args([
            "build",
            "--quiet",
            "--profile",
            GUEST_PROFILE,
            "--target",
            GUEST_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for name in EXAMPLE_NAMES {
        command.args(["-p", name]);
    }
    // Settings meant for the outer (host) build must not leak into this one.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("target may not be installed")
            || stderr.contains("can't find crate for `core`")
            || stderr.contains("can't find crate for `std`")
        {
            return Err(TargetMissing.into());
        }
        bail!(
            "cargo build for {GUEST_TARGET} failed ({}):\n{stderr}",
            output.status
        );
    }
    Ok(target_dir.join(GUEST_TARGET).join(GUEST_PROFILE))
}

/// The workspace root: the parent of this crate's manifest directory as it was
/// at compile time, or else the nearest ancestor of the current directory that
/// holds `examples-wasm/` (for a binary moved away from its sources).
fn workspace_dir() -> anyhow::Result<PathBuf> {
    let is_workspace =
        |dir: &Path| dir.join("examples-wasm").is_dir() && dir.join("Cargo.toml").is_file();
    let compiled_in = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf);
    if let Some(dir) = compiled_in.filter(|dir| is_workspace(dir)) {
        return Ok(dir);
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    cwd.ancestors()
        .find(|dir| is_workspace(dir))
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "cannot find the Paxwasm workspace (a directory with examples-wasm/ and Cargo.toml) \
                 at {} or above {}",
                env!("CARGO_MANIFEST_DIR"),
                cwd.display()
            )
        })
}
