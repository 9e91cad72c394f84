//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time, and the process must `dlopen` a
//! `libonnxruntime.so` before it uses any other `ort` API. This module finds that library and creates the single
//! process-wide [`ort::environment::Environment`] every session is built under:
//!
//! ```no_run
//! let env = pio_runtime::ort_lib::environment()?;
//! let session = ort::session::Session::builder(env)?.commit_from_file("graphs/model.onnx")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Call [`environment()`] before anything else in `ort`** (tensor creation included): an `ort` call made before
//! the library is loaded makes `ort` load `libonnxruntime.so` from the system loader path on its own, and panic if
//! there is none. ONNX Runtime allows one environment per process, so never call `ort::init()` elsewhere.
//!
//! Search order of [`find_onnxruntime_library`] (the README has the user-facing description):
//!
//! 1. `ORT_DYLIB_PATH`: a library file (or a folder holding one); if set, it must exist, and nothing else is tried.
//! 2. Cache folders `ort/` and `ort-gpu/`: first under `PIO_CACHE_DIR`, then `.cache/pio/` in the current directory
//!    and every parent, then the same from the running executable's folder upward, then from this crate's source
//!    folder upward (so binaries and tests built in a checkout find the checkout's cache). `ort/` is tried before
//!    `ort-gpu/` unless `PIO_ORT_FLAVOR=gpu`.
//! 3. A pip-installed `onnxruntime` / `onnxruntime-gpu` of `python3` (or `PIO_PYTHON`): `onnxruntime/capi/`.
//!
//! Across all of these, a file named for the preferred version ([`ORT_VERSION`], or `PIO_ORT_VERSION`) wins; failing
//! that, the first other `libonnxruntime.so.1.x` with `x >=` [`ort::MINOR_VERSION`] is used with a warning. Older
//! libraries are skipped (ort would refuse them) and reported in the error.
//!
//! Failures are [`OrtLibError`]s: one variant per way `ORT_DYLIB_PATH` can be wrong, one for nothing found (listing
//! where it looked), and the loading and environment failures with `ort`'s error as their source.

use std::{
    collections::HashSet,
    ffi::OsString,
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use ort::environment::Environment;

/// The ONNX Runtime release this project is built and tested against (what `scripts/setup.sh` downloads).
pub const ORT_VERSION: &str = "1.31.1";

/// Path of the library to load; overrides every other search location.
pub const ENV_ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";
/// Cache root to search first (its `ort/` and `ort-gpu/` subfolders); `scripts/setup.sh` fills it when set.
pub const ENV_PIO_CACHE_DIR: &str = "PIO_CACHE_DIR";
/// Preferred ONNX Runtime version (default [`ORT_VERSION`]); `scripts/setup.sh` downloads this version.
pub const ENV_PIO_ORT_VERSION: &str = "PIO_ORT_VERSION";
/// `gpu` (or `cuda`) to try `ort-gpu/` before `ort/` in each cache folder.
pub const ENV_PIO_ORT_FLAVOR: &str = "PIO_ORT_FLAVOR";
/// Python interpreter probed for a pip-installed `onnxruntime` (default `python3`; `0`, `off` or `none` disables).
pub const ENV_PIO_PYTHON: &str = "PIO_PYTHON";

/// Cache folder, relative to a project root, that `scripts/setup.sh` fills.
pub const PROJECT_CACHE_DIR: &str = ".cache/pio";
/// A folder: ONNX Runtime profiles every session the runtime loads into it (see [`profiled`]).
pub const ENV_PIO_ORT_PROFILE: &str = "PIO_ORT_PROFILE";

const PYTHON_TIMEOUT: Duration = Duration::from_secs(10);

/// Why ONNX Runtime could not be found or loaded. Each message names the path or the places searched and says how
/// to fix it.
#[derive(Debug, thiserror::Error)]
pub enum OrtLibError {
    /// `ORT_DYLIB_PATH` names a folder without a usable `libonnxruntime.so` (`rejected`: files found but too old).
    #[error(
        "{ENV_ORT_DYLIB_PATH} is set to the folder '{}', which holds no usable libonnxruntime.so{}; point it to the \
         library file (e.g. libonnxruntime.so.{preferred}) or unset it",
        dir.display(),
        describe_rejected(rejected)
    )]
    DylibPathNoLibrary { dir: PathBuf, preferred: String, rejected: Vec<(PathBuf, String)> },
    /// `ORT_DYLIB_PATH` names a file that does not exist.
    #[error(
        "{ENV_ORT_DYLIB_PATH} is set to '{}', but that file does not exist; point it to a libonnxruntime.so (e.g. \
         from scripts/setup.sh: .cache/pio/ort/libonnxruntime.so.{ORT_VERSION}) or unset it",
        path.display()
    )]
    DylibPathMissing { path: PathBuf },
    /// No library anywhere: `report` lists the places searched, the libraries found but refused, and how to get one.
    #[error("{report}")]
    NotFound { report: String },
    /// The library was found but could not be loaded (not a library, a missing dependency, too old a version).
    #[error("failed to load ONNX Runtime from '{}'", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: ort::LoadDynamicError,
    },
    /// The library loaded, but ONNX Runtime refused to create its environment.
    #[error("failed to create the ONNX Runtime environment ({})", path.display())]
    Environment {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },
}

/// Why asking `python` for its `onnxruntime` package failed (one line of [`OrtLibError::NotFound`]'s report).
#[derive(Debug, thiserror::Error)]
enum PythonProbeError {
    #[error("could not run it")]
    Spawn(#[source] std::io::Error),
    #[error("could not wait for it")]
    Wait(#[source] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("exited with {0}")]
    Failed(std::process::ExitStatus),
}

/// Where to look for the library. [`SearchOptions::from_env`] gives what [`find_onnxruntime_library`] uses; tests
/// and callers with their own configuration (a `--ort-lib` flag, say) build one by hand.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Explicit library file or folder (`ORT_DYLIB_PATH`). When set, nothing else is searched.
    pub dylib_path: Option<PathBuf>,
    /// A cache root (`PIO_CACHE_DIR`) whose `ort/` and `ort-gpu/` are searched before the project caches.
    pub cache_dir: Option<PathBuf>,
    /// Directories from which `.cache/pio/` is searched for upward (each directory, then its parents).
    pub start_dirs: Vec<PathBuf>,
    /// Python interpreter to ask for a pip-installed `onnxruntime`; `None` skips that step.
    pub python: Option<OsString>,
    /// The version whose file name (`libonnxruntime.so.<version>`) is preferred.
    pub preferred_version: String,
    /// Search each cache's `ort-gpu/` before its `ort/`.
    pub prefer_gpu: bool,
}

impl Default for SearchOptions {
    /// No locations at all; the preferred version is [`ORT_VERSION`].
    fn default() -> Self {
        Self {
            dylib_path: None,
            cache_dir: None,
            start_dirs: Vec::new(),
            python: None,
            preferred_version: ORT_VERSION.to_string(),
            prefer_gpu: false,
        }
    }
}

impl SearchOptions {
    /// The process's configuration: environment variables, the current directory, the executable's folder and
    /// this crate's source folder, and `python3`.
    pub fn from_env() -> Self {
        let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let mut start_dirs = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            start_dirs.push(cwd);
        }
        if let Some(exe_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
            start_dirs.push(exe_dir);
        }
        start_dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        let python = match non_empty(ENV_PIO_PYTHON) {
            Some(p) if matches!(p.to_str(), Some("0" | "off" | "none" | "false")) => None,
            Some(p) => Some(p),
            None => Some(OsString::from("python3")),
        };
        let flavor = std::env::var(ENV_PIO_ORT_FLAVOR).unwrap_or_default().to_ascii_lowercase();
        Self {
            dylib_path: non_empty(ENV_ORT_DYLIB_PATH).map(PathBuf::from),
            cache_dir: non_empty(ENV_PIO_CACHE_DIR).map(PathBuf::from),
            start_dirs,
            python,
            preferred_version: std::env::var(ENV_PIO_ORT_VERSION)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| ORT_VERSION.to_string()),
            prefer_gpu: matches!(flavor.as_str(), "gpu" | "cuda" | "tensorrt"),
        }
    }

    /// The cache roots (folders holding `ort/`, `tokenizers/`, ...) in search order, existing or not:
    /// `cache_dir`, then `<dir>/.cache/pio` for every start directory and each of its parents, without repeats.
    pub fn cache_roots(&self) -> Vec<PathBuf> {
        let mut seen = HashSet::new();
        let mut roots = Vec::new();
        let mut push = |p: PathBuf| {
            let key = normalize(&p);
            if seen.insert(key) {
                roots.push(p);
            }
        };
        if let Some(dir) = &self.cache_dir {
            push(dir.clone());
        }
        for start in &self.start_dirs {
            let start = normalize(start);
            for dir in start.ancestors() {
                push(dir.join(PROJECT_CACHE_DIR));
            }
        }
        roots
    }
}

/// The cache roots of this process (see [`SearchOptions::cache_roots`]) that exist, e.g. to find
/// `tokenizers/qwen3/tokenizer.json` fetched by `scripts/setup.sh`.
pub fn cache_roots() -> Vec<PathBuf> {
    SearchOptions::from_env().cache_roots().into_iter().filter(|p| p.is_dir()).collect()
}

/// Finds `libonnxruntime.so` for this process (see the [module docs](self) for the order).
pub fn find_onnxruntime_library() -> Result<PathBuf, OrtLibError> {
    find_onnxruntime_library_with(&SearchOptions::from_env())
}

/// [`find_onnxruntime_library`] with explicit locations.
pub fn find_onnxruntime_library_with(opts: &SearchOptions) -> Result<PathBuf, OrtLibError> {
    let preferred = opts.preferred_version.as_str();

    // 1. ORT_DYLIB_PATH: explicit, so it must exist and nothing else is tried.
    if let Some(path) = &opts.dylib_path {
        if path.is_dir() {
            let scan = scan_dir(path, preferred);
            return match scan.best {
                Some(c) => {
                    c.warn_if_not_preferred(preferred);
                    Ok(absolute(&c.path))
                }
                None => Err(OrtLibError::DylibPathNoLibrary {
                    dir: path.clone(),
                    preferred: preferred.to_string(),
                    rejected: scan.rejected,
                }),
            };
        }
        if !path.exists() {
            return Err(OrtLibError::DylibPathMissing { path: path.clone() });
        }
        return Ok(absolute(path));
    }

    let mut looked = Vec::<String>::new();
    let mut fallback: Option<Candidate> = None;
    let mut rejected = Vec::<(PathBuf, String)>::new();
    let visit =
        |dir: &Path, fallback: &mut Option<Candidate>, rejected: &mut Vec<(PathBuf, String)>| -> Option<PathBuf> {
            let scan = scan_dir(dir, preferred);
            rejected.extend(scan.rejected);
            match scan.best {
                Some(c) if c.is_preferred(preferred) => Some(c.path),
                Some(c) => {
                    if fallback.is_none() {
                        *fallback = Some(c);
                    }
                    None
                }
                None => None,
            }
        };

    // 2. Cache folders.
    let flavors: [&str; 2] = if opts.prefer_gpu { ["ort-gpu", "ort"] } else { ["ort", "ort-gpu"] };
    let roots = opts.cache_roots();
    for root in &roots {
        for flavor in flavors {
            if let Some(found) = visit(&root.join(flavor), &mut fallback, &mut rejected) {
                return Ok(absolute(&found));
            }
        }
    }
    if let Some(dir) = &opts.cache_dir {
        looked.push(format!("{ENV_PIO_CACHE_DIR}: {}/{{ort,ort-gpu}}/", dir.display()));
    } else {
        looked.push(format!("{ENV_PIO_CACHE_DIR}: not set"));
    }
    let project_roots: Vec<String> = roots
        .iter()
        .filter(|r| Some(*r) != opts.cache_dir.as_ref())
        .filter_map(|r| r.parent()?.parent().map(|p| p.display().to_string()))
        .collect();
    looked.push(format!(
        "{PROJECT_CACHE_DIR}/{{ort,ort-gpu}}/ in each of: {}",
        if project_roots.is_empty() { "(no start directories)".to_string() } else { project_roots.join(", ") }
    ));

    // 3. pip-installed onnxruntime.
    match &opts.python {
        None => looked.push("python: not probed".to_string()),
        Some(python) => match python_onnxruntime_dirs(python) {
            Ok(dirs) if dirs.is_empty() => {
                looked.push(format!("{}: no onnxruntime package installed", python.to_string_lossy()))
            }
            Ok(dirs) => {
                for dir in &dirs {
                    if let Some(found) = visit(dir, &mut fallback, &mut rejected) {
                        return Ok(absolute(&found));
                    }
                }
                let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                looked.push(format!("{} site-packages: {}", python.to_string_lossy(), list.join(", ")));
            }
            Err(e) => looked.push(format!("{}: {}", python.to_string_lossy(), error_chain(&e))),
        },
    }

    if let Some(c) = fallback {
        c.warn_if_not_preferred(preferred);
        return Ok(absolute(&c.path));
    }

    let mut msg = format!(
        "could not find the ONNX Runtime library (libonnxruntime.so; version {preferred} preferred, 1.{}.x or newer \
         required by ort {})\nlooked at:\n  - {ENV_ORT_DYLIB_PATH}: not set\n",
        ort::MINOR_VERSION,
        ORT_CRATE_VERSION
    );
    for l in &looked {
        let _ = writeln!(msg, "  - {l}");
    }
    msg.push_str(describe_rejected(&rejected).trim_start_matches('\n'));
    let _ = write!(
        msg,
        "to get one, do any of:\n  \
         - run scripts/setup.sh in the Inference-PIO checkout (puts ONNX Runtime {ORT_VERSION} into .cache/pio/ort/; \
         --gpu for the CUDA/TensorRT build)\n  \
         - pip install onnxruntime=={ORT_VERSION} (or onnxruntime-gpu=={ORT_VERSION})\n  \
         - set {ENV_ORT_DYLIB_PATH}=/path/to/libonnxruntime.so.{ORT_VERSION}"
    );
    Err(OrtLibError::NotFound { report: msg })
}

const ORT_CRATE_VERSION: &str = "2.0.0-rc.15";

struct Global {
    env: Environment,
    path: PathBuf,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The process-wide ONNX Runtime environment, loading the library found by [`find_onnxruntime_library`] on the first
/// call. Later calls return the same environment; a failed first call is retried by the next one.
pub fn environment() -> Result<&'static Environment, OrtLibError> {
    if let Some(g) = GLOBAL.get() {
        return Ok(&g.env);
    }
    init_environment(&SearchOptions::from_env())
}

/// Like [`environment`], but searches with `opts` if the environment is not created yet (e.g. a CLI `--ort-lib`
/// flag: `SearchOptions { dylib_path: Some(path), ..SearchOptions::from_env() }`). If it already exists, it is
/// returned as is.
pub fn init_environment(opts: &SearchOptions) -> Result<&'static Environment, OrtLibError> {
    if let Some(g) = GLOBAL.get() {
        return Ok(&g.env);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(g) = GLOBAL.get() {
        return Ok(&g.env);
    }
    let path = find_onnxruntime_library_with(opts)?;
    tracing::info!(path = %path.display(), "loading ONNX Runtime");
    // `ort::init_from` dlopens the library and checks its version (>= 1.MINOR_VERSION); it only loads once per
    // process, so a retry after a failed `build` reuses the already loaded library.
    let env = match ort::init_from(&path) {
        Ok(builder) => builder.with_name("pio").with_telemetry(false).build(),
        Err(source) => return Err(OrtLibError::Load { path, source }),
    };
    let env = env.map_err(|source| OrtLibError::Environment { path: path.clone(), source })?;
    tracing::info!(path = %path.display(), "ONNX Runtime environment ready");
    let g = GLOBAL.get_or_init(|| Global { env, path });
    Ok(&g.env)
}

/// With [`ENV_PIO_ORT_PROFILE`] set to a folder, turns on ONNX Runtime's profiler for the session
/// of `graph`: when the session is dropped it writes a Chrome trace of every run (each node's
/// time, provider and shapes) to `<folder>/<graph's file stem>_<timestamp>.json`.
/// `scripts/ort_profile_summary.py` totals one per operator. A diagnostic: a folder that cannot
/// be made is reported and the session loads unprofiled.
pub fn profiled(
    builder: ort::session::builder::SessionBuilder,
    graph: &Path,
) -> Result<ort::session::builder::SessionBuilder, ort::Error> {
    match std::env::var_os(ENV_PIO_ORT_PROFILE) {
        Some(dir) if !dir.is_empty() => profile_into(builder, graph, Path::new(&dir)),
        _ => Ok(builder),
    }
}

fn profile_into(
    builder: ort::session::builder::SessionBuilder,
    graph: &Path,
    dir: &Path,
) -> Result<ort::session::builder::SessionBuilder, ort::Error> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!(
            "{ENV_PIO_ORT_PROFILE}: cannot make {} ({e}); {} runs unprofiled",
            dir.display(),
            graph.display()
        );
        return Ok(builder);
    }
    let stem = graph.file_stem().map_or_else(|| "session".into(), |s| s.to_string_lossy().into_owned());
    tracing::info!("profiling {} into {}", graph.display(), dir.join(format!("{stem}_*.json")).display());
    builder.with_profiling(dir.join(stem)).map_err(ort::Error::from)
}

/// The library the environment was created from, once [`environment`] succeeded.
pub fn loaded_library_path() -> Option<&'static Path> {
    GLOBAL.get().map(|g| g.path.as_path())
}

// ---------------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    /// Parsed from the file name, or from the name a `libonnxruntime.so` symlink points to.
    version: Option<Version>,
}

impl Candidate {
    fn is_preferred(&self, preferred: &str) -> bool {
        self.version.as_ref().is_some_and(|v| v.text == preferred)
    }

    fn warn_if_not_preferred(&self, preferred: &str) {
        if !self.is_preferred(preferred) {
            let found = self.version.as_ref().map_or("an unknown version", |v| v.text.as_str());
            tracing::warn!(
                path = %self.path.display(),
                "using ONNX Runtime {found}, not {preferred} which this project is tested with \
                 (run scripts/setup.sh or set {ENV_ORT_DYLIB_PATH} to use {preferred})"
            );
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    text: String,
    parts: Vec<u32>,
}

impl Version {
    fn parse(text: &str) -> Option<Self> {
        let parts = text.split('.').map(|p| p.parse::<u32>().ok()).collect::<Option<Vec<_>>>()?;
        (parts.len() >= 2).then(|| Self { text: text.to_string(), parts })
    }

    /// ort refuses libraries older than the API version it was built for.
    fn is_supported(&self) -> bool {
        self.parts[0] == 1 && self.parts[1] >= ort::MINOR_VERSION
    }
}

struct DirScan {
    best: Option<Candidate>,
    rejected: Vec<(PathBuf, String)>,
}

/// The suffix after `libonnxruntime.so` when `name` is the main library: `Some("")` for `libonnxruntime.so`,
/// `Some("1.31.1")` for `libonnxruntime.so.1.31.1`; `None` for anything else (providers, `.part` files, ...).
fn lib_suffix(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("libonnxruntime.so")?;
    if rest.is_empty() {
        return Some("");
    }
    let rest = rest.strip_prefix('.')?;
    rest.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).then_some(rest)
}

/// The best library in `dir`: the preferred version, else the newest supported one, else one of unknown version.
fn scan_dir(dir: &Path, preferred: &str) -> DirScan {
    let mut scan = DirScan { best: None, rejected: Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return scan;
    };
    let mut candidates = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(suffix) = lib_suffix(name) else {
            continue;
        };
        let path = entry.path();
        if !path.is_file() {
            continue; // a dangling symlink or a folder
        }
        // `libonnxruntime.so` / `.so.1` are usually links to the fully versioned file.
        let version = Version::parse(suffix).filter(|v| v.parts.len() >= 3).or_else(|| {
            let target = std::fs::canonicalize(&path).ok()?;
            Version::parse(lib_suffix(target.file_name()?.to_str()?)?)
        });
        match &version {
            Some(v) if !v.is_supported() => scan.rejected.push((
                path,
                format!(
                    "version {} is older than 1.{} which ort {ORT_CRATE_VERSION} needs",
                    v.text,
                    ort::MINOR_VERSION
                ),
            )),
            _ => candidates.push(Candidate { path, version }),
        }
    }
    // Preferred version first; then the newest known version; then unknown versions. Among equals, the longest
    // (most explicit) file name, so the real file wins over links to it.
    candidates.sort_by(|a, b| {
        let key = |c: &Candidate| {
            (
                !c.is_preferred(preferred),
                c.version.is_none(),
                std::cmp::Reverse(c.version.as_ref().map(|v| v.parts.clone())),
                std::cmp::Reverse(c.path.file_name().map_or(0, |n| n.len())),
            )
        };
        key(a).cmp(&key(b))
    });
    scan.best = candidates.into_iter().next();
    scan
}

fn describe_rejected(rejected: &[(PathBuf, String)]) -> String {
    if rejected.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nfound but not usable:\n");
    for (path, why) in rejected {
        let _ = writeln!(s, "  - {}: {why}", path.display());
    }
    s
}

/// Folders `.../onnxruntime/capi/` of the `onnxruntime` (or `onnxruntime-gpu`, same package name) that `python`
/// would import, then of every `sys.path` / site-packages entry; existing ones only. The package is located with
/// `importlib.util.find_spec`, so it is not imported (fast, and no native code runs).
fn python_onnxruntime_dirs(python: &OsString) -> Result<Vec<PathBuf>, PythonProbeError> {
    const SCRIPT: &str = r#"
import importlib.util, sys
try:
    import site
    extra = list(site.getsitepackages()) + [site.getusersitepackages()]
except Exception:
    extra = []
try:
    spec = importlib.util.find_spec("onnxruntime")
except Exception:
    spec = None
if spec is not None:
    for loc in (spec.submodule_search_locations or []):
        print("pkg\t" + loc)
for p in list(sys.path) + extra:
    if p:
        print("path\t" + p)
"#;
    let out = run_with_timeout(Command::new(python).args(["-c", SCRIPT]), PYTHON_TIMEOUT)?;
    let mut seen = HashSet::new();
    let mut dirs = Vec::new();
    for line in out.lines() {
        let dir = match line.split_once('\t') {
            Some(("pkg", loc)) => Path::new(loc).join("capi"),
            Some(("path", p)) => Path::new(p).join("onnxruntime").join("capi"),
            _ => continue,
        };
        if dir.is_dir() && seen.insert(normalize(&dir)) {
            dirs.push(dir);
        }
    }
    Ok(dirs)
}

/// Runs `cmd`, returning its stdout; kills it after `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<String, PythonProbeError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(PythonProbeError::Spawn)?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(PythonProbeError::Wait)? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PythonProbeError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(PythonProbeError::Failed(status));
    }
    Ok(out)
}

/// `error` and its sources, `: `-separated (one line of a report that lists many places).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let _ = write!(text, ": {e}");
        source = e.source();
    }
    text
}

/// Absolute, with `.`/`..` resolved lexically where possible (no symlink resolution; missing paths are fine).
fn normalize(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| absolute(p))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"not really a library").unwrap();
    }

    fn opts(start_dirs: Vec<PathBuf>) -> SearchOptions {
        SearchOptions { start_dirs, ..SearchOptions::default() }
    }

    #[test]
    fn ort_dylib_path_to_missing_file_is_a_named_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope/libonnxruntime.so.1.31.1");
        let o = SearchOptions { dylib_path: Some(missing.clone()), ..opts(vec![tmp.path().to_path_buf()]) };
        let err = find_onnxruntime_library_with(&o).unwrap_err();
        assert!(matches!(&err, OrtLibError::DylibPathMissing { path } if *path == missing), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn ort_dylib_path_to_a_folder_without_a_library_names_the_folder_and_what_was_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("libonnxruntime.so.1.20.0");
        touch(&old);
        let o = SearchOptions { dylib_path: Some(tmp.path().to_path_buf()), ..SearchOptions::default() };
        let err = find_onnxruntime_library_with(&o).unwrap_err();
        assert!(
            matches!(&err, OrtLibError::DylibPathNoLibrary { dir, rejected, .. }
            if dir == tmp.path() && rejected.len() == 1),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(err.contains(&tmp.path().display().to_string()) && err.contains("libonnxruntime.so.1.20.0"), "{err}");
    }

    #[test]
    fn ort_dylib_path_wins_over_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let explicit = tmp.path().join("elsewhere/libonnxruntime.so.1.40.0");
        touch(&explicit);
        touch(&tmp.path().join(".cache/pio/ort/libonnxruntime.so.1.31.1"));
        let o = SearchOptions { dylib_path: Some(explicit.clone()), ..opts(vec![tmp.path().to_path_buf()]) };
        assert_eq!(find_onnxruntime_library_with(&o).unwrap(), explicit);
    }

    #[test]
    fn finds_the_project_cache_from_a_nested_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join(".cache/pio/ort/libonnxruntime.so.1.31.1");
        touch(&lib);
        touch(&tmp.path().join(".cache/pio/ort/libonnxruntime_providers_shared.so"));
        let nested = tmp.path().join("target/debug/deps");
        std::fs::create_dir_all(&nested).unwrap();
        let found = find_onnxruntime_library_with(&opts(vec![nested])).unwrap();
        assert_eq!(normalize(&found), normalize(&lib));
    }

    #[test]
    fn prefers_the_exact_version_and_skips_old_ones() {
        let tmp = tempfile::tempdir().unwrap();
        // A newer one in the nearer cache, the preferred one further up, an old one nearest.
        let near = tmp.path().join("a/b");
        touch(&near.join(".cache/pio/ort/libonnxruntime.so.1.20.0"));
        touch(&tmp.path().join("a/.cache/pio/ort/libonnxruntime.so.1.32.0"));
        let exact = tmp.path().join(".cache/pio/ort-gpu/libonnxruntime.so.1.31.1");
        touch(&exact);
        let found = find_onnxruntime_library_with(&opts(vec![near.clone()])).unwrap();
        assert_eq!(normalize(&found), normalize(&exact));

        // Without the preferred version, the supported other one is taken.
        std::fs::remove_file(&exact).unwrap();
        let found = find_onnxruntime_library_with(&opts(vec![near.clone()])).unwrap();
        assert!(found.ends_with("a/.cache/pio/ort/libonnxruntime.so.1.32.0"), "{}", found.display());

        // Only the old one: an error that names it and says how to get a good one.
        std::fs::remove_file(tmp.path().join("a/.cache/pio/ort/libonnxruntime.so.1.32.0")).unwrap();
        let err = find_onnxruntime_library_with(&opts(vec![near])).unwrap_err().to_string();
        assert!(err.contains("libonnxruntime.so.1.20.0"), "{err}");
        assert!(err.contains("scripts/setup.sh"), "{err}");
        assert!(err.contains("pip install onnxruntime==1.31.1"), "{err}");
        assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
    }

    #[test]
    fn cache_dir_and_gpu_preference() {
        let tmp = tempfile::tempdir().unwrap();
        let custom = tmp.path().join("custom");
        let cpu = custom.join("ort/libonnxruntime.so.1.31.1");
        let gpu = custom.join("ort-gpu/libonnxruntime.so.1.31.1");
        touch(&cpu);
        touch(&gpu);
        touch(&tmp.path().join("proj/.cache/pio/ort/libonnxruntime.so.1.31.1"));
        let o = SearchOptions { cache_dir: Some(custom), ..opts(vec![tmp.path().join("proj")]) };
        assert_eq!(find_onnxruntime_library_with(&o).unwrap(), cpu);
        let o = SearchOptions { prefer_gpu: true, ..o };
        assert_eq!(find_onnxruntime_library_with(&o).unwrap(), gpu);
    }

    #[test]
    #[cfg(unix)]
    fn versionless_links_resolve_to_their_target() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("lib/libonnxruntime.so.1.31.1");
        touch(&real);
        let dir = tmp.path().join(".cache/pio/ort");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&real, dir.join("libonnxruntime.so")).unwrap();
        let found = find_onnxruntime_library_with(&opts(vec![tmp.path().to_path_buf()])).unwrap();
        assert_eq!(found.file_name().unwrap(), "libonnxruntime.so");
        assert_eq!(normalize(&found), normalize(&real));
    }

    #[test]
    fn nothing_found_lists_the_places_searched() {
        let tmp = tempfile::tempdir().unwrap();
        let err = find_onnxruntime_library_with(&opts(vec![tmp.path().to_path_buf()])).unwrap_err();
        assert!(matches!(err, OrtLibError::NotFound { .. }), "{err:?}");
        let err = err.to_string();
        eprintln!("{err}");
        assert!(err.contains(&normalize(tmp.path()).display().to_string()), "{err}");
        assert!(err.contains(".cache/pio/{ort,ort-gpu}/"), "{err}");
    }

    #[test]
    #[cfg(unix)]
    fn finds_a_pip_installed_onnxruntime() {
        use std::os::unix::fs::PermissionsExt as _;
        if !matches!(Command::new("python3").args(["-c", "pass"]).status(), Ok(s) if s.success()) {
            eprintln!("skipping finds_a_pip_installed_onnxruntime: no python3");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let site = tmp.path().join("site-packages");
        touch(&site.join("onnxruntime/__init__.py"));
        let lib = site.join("onnxruntime/capi/libonnxruntime.so.1.31.1");
        touch(&lib);
        // A python3 whose sys.path includes our fake site-packages, without touching this process's environment.
        let wrapper = tmp.path().join("python");
        std::fs::write(&wrapper, format!("#!/bin/sh\nPYTHONPATH='{}' exec python3 \"$@\"\n", site.display())).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = SearchOptions { python: Some(wrapper.into_os_string()), ..opts(vec![tmp.path().join("elsewhere")]) };
        let found = find_onnxruntime_library_with(&o).unwrap();
        assert_eq!(normalize(&found), normalize(&lib));
    }

    #[test]
    fn library_file_names() {
        assert_eq!(lib_suffix("libonnxruntime.so"), Some(""));
        assert_eq!(lib_suffix("libonnxruntime.so.1"), Some("1"));
        assert_eq!(lib_suffix("libonnxruntime.so.1.31.1"), Some("1.31.1"));
        assert_eq!(lib_suffix("libonnxruntime_providers_shared.so"), None);
        assert_eq!(lib_suffix("libonnxruntime.so.1.31.1.part"), None);
        assert_eq!(lib_suffix("libonnxruntime.so.1..1"), None);
    }

    /// Loads the real library (from `scripts/setup.sh`'s cache, a pip install or `ORT_DYLIB_PATH`) and runs
    /// `tests/fixtures/tiny_add.onnx` (c = a + b over float[n]; made with the `onnx` python package, opset 13).
    /// Skipped when no library is found, except under CI (`CI` set), where setup.sh has run and it must pass.
    #[test]
    fn environment_runs_a_tiny_model() -> anyhow::Result<()> {
        const TINY_ADD: &[u8] =
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny_add.onnx"));
        let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
        if let Err(e) = find_onnxruntime_library() {
            if in_ci {
                return Err(anyhow::Error::new(e)
                    .context("CI is set, so ONNX Runtime must be available (did scripts/setup.sh run?)"));
            }
            eprintln!("skipping environment_runs_a_tiny_model: {e}");
            return Ok(());
        }

        let env = environment()?;
        assert!(std::ptr::eq(env, environment()?), "environment() is created once");
        let path = loaded_library_path().expect("loaded");
        assert!(path.file_name().unwrap().to_string_lossy().starts_with("libonnxruntime.so"));

        let mut session = ort::session::Session::builder(env)?
            .with_intra_threads(1)
            .map_err(ort::Error::<()>::from)?
            .commit_from_memory(TINY_ADD)?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        assert_eq!(names, ["a", "b"]);

        let a = ort::value::Tensor::from_array((vec![3_i64], vec![1.0_f32, 2.0, 3.0]))?;
        let b = ort::value::Tensor::from_array((vec![3_i64], vec![10.0_f32, 20.0, 30.0]))?;
        let outputs = session.run(ort::inputs!["a" => a, "b" => b])?;
        let (shape, c) = outputs["c"].try_extract_tensor::<f32>()?;
        assert_eq!(shape.to_vec(), vec![3_i64]);
        assert_eq!(c, [11.0, 22.0, 33.0]);
        Ok(())
    }

    /// A profiled session writes its trace, named for the graph, when dropped: the node events
    /// of its run are there.
    #[test]
    fn a_profiled_session_writes_its_trace_when_dropped() -> anyhow::Result<()> {
        const TINY_ADD: &[u8] =
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny_add.onnx"));
        if find_onnxruntime_library().is_err() {
            eprintln!("skipping a_profiled_session_writes_its_trace_when_dropped: no ONNX Runtime library");
            return Ok(());
        }
        let env = environment()?;
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("profiles");
        let builder = ort::session::Session::builder(env)?;
        let mut session =
            profile_into(builder, Path::new("graphs/tiny_add.onnx"), &dir)?.commit_from_memory(TINY_ADD)?;
        let a = ort::value::Tensor::from_array((vec![2_i64], vec![1.0_f32, 2.0]))?;
        let b = ort::value::Tensor::from_array((vec![2_i64], vec![3.0_f32, 4.0]))?;
        session.run(ort::inputs!["a" => a, "b" => b])?;
        drop(session);
        let traces: Vec<PathBuf> = std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        assert_eq!(traces.len(), 1, "{traces:?}");
        let name = traces[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("tiny_add_") && name.ends_with(".json"), "{name}");
        let trace = std::fs::read_to_string(&traces[0])?;
        assert!(trace.contains("\"op_name\" : \"Add\"") || trace.contains("\"op_name\":\"Add\""), "{trace}");
        Ok(())
    }

    /// A file that is no library: the load fails with `ort`'s error as the source, naming the path. Runs in a child
    /// process (ort loads one library per process, and this one must not be the real one's).
    #[test]
    fn a_file_that_is_no_library_fails_to_load_with_the_ort_error_as_source() {
        if std::env::var_os("PIO_TEST_BAD_LIBRARY_CHILD").is_none() {
            let tmp = tempfile::tempdir().unwrap();
            let bogus = tmp.path().join("libonnxruntime.so.1.31.1");
            touch(&bogus);
            let out = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "ort_lib::tests::a_file_that_is_no_library_fails_to_load_with_the_ort_error_as_source",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env("PIO_TEST_BAD_LIBRARY_CHILD", &bogus)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("checked the load error"), "{text}");
            return;
        }
        let bogus = PathBuf::from(std::env::var_os("PIO_TEST_BAD_LIBRARY_CHILD").unwrap());
        let err = init_environment(&SearchOptions { dylib_path: Some(bogus.clone()), ..SearchOptions::default() })
            .unwrap_err();
        assert!(matches!(&err, OrtLibError::Load { path, .. } if *path == absolute(&bogus)), "{err:?}");
        assert!(err.to_string().contains(&bogus.display().to_string()), "{err}");
        let source = std::error::Error::source(&err).expect("the load error keeps ort's error");
        assert!(source.downcast_ref::<ort::LoadDynamicError>().is_some(), "{source:?}");
        assert!(source.to_string().contains(&bogus.display().to_string()), "{source}");
        eprintln!("checked the load error: {err}: {source}");
    }
}
