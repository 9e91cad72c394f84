//! NVRTC, CUDA's runtime compiler, found at run time and driven through `cudarc`: the kernels are
//! compiled for the device's own architecture when a session loads, and the cubins are cached on
//! disk (key: source, options, architecture and NVRTC version), so only the first load pays.
//!
//! Where libnvrtc is looked for, in order (the first that loads wins):
//! 1. `PIO_NVRTC_PATH`: the library file, or a folder holding it (nothing else is tried when set);
//! 2. `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`;
//! 3. the loader path (`libnvrtc.so.13`, `.12`, `libnvrtc.so`: `LD_LIBRARY_PATH`, the ld cache);
//! 4. `nvrtc/` in the project cache (`scripts/setup.sh` puts the PyPI `nvidia-cuda-nvrtc` library there);
//! 5. the `nvidia` packages of `python3` (`nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`: torch installs them).
//!
//! The library is loaded by path, then `cudarc` opens it by its soname and gets the same object
//! (glibc matches loaded libraries by soname); the two version answers are compared to be sure.

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nvrtc, sys};

use crate::error::{KernelError, Result};

/// Environment variable naming the libnvrtc file (or its folder) to use.
pub const NVRTC_ENV: &str = "PIO_NVRTC_PATH";
/// Environment variable naming the folder of compiled kernels (default `$PIO_CACHE_DIR/kernels`,
/// else `~/.cache/pio/kernels`).
pub const KERNEL_CACHE_ENV: &str = "PIO_KERNEL_CACHE";

const SONAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
const CUDA_ROOT_ENVS: &[&str] = &["CUDA_HOME", "CUDA_PATH"];

/// The loaded NVRTC.
pub struct Nvrtc {
    /// The file (or soname) that was loaded.
    pub location: PathBuf,
    pub version: (i32, i32),
    _lib: libloading::Library,
}

/// One place libnvrtc may be.
#[derive(Clone, Debug, PartialEq)]
enum Candidate {
    File(PathBuf),
    Soname(&'static str),
}

impl Candidate {
    fn describe(&self) -> String {
        match self {
            Candidate::File(p) => p.display().to_string(),
            Candidate::Soname(s) => format!("{s} on the loader path"),
        }
    }
}

/// The library files of `dir`, in soname order.
fn in_dir(dir: &Path) -> Vec<Candidate> {
    SONAMES.iter().map(|s| dir.join(s)).filter(|p| p.is_file()).map(Candidate::File).collect()
}

/// `nvidia/*/lib` folders of python3's site-packages that may hold libnvrtc (pip's CUDA 13 and 12 layouts).
fn python_nvidia_dirs() -> Vec<PathBuf> {
    let python = std::env::var("PIO_PYTHON").unwrap_or_else(|_| "python3".into());
    if python == "off" {
        return Vec::new();
    }
    let script = "import nvidia, os; print(os.pathsep.join(nvidia.__path__))";
    let Ok(out) = std::process::Command::new(&python).args(["-c", script]).output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&out.stdout);
    std::env::split_paths(text.trim())
        .flat_map(|root| [root.join("cu13").join("lib"), root.join("cuda_nvrtc").join("lib")])
        .collect()
}

/// Where to look, in order; `Err` when `PIO_NVRTC_PATH` is set but holds no library.
fn candidates() -> std::result::Result<Vec<Candidate>, String> {
    if let Some(explicit) = std::env::var_os(NVRTC_ENV).map(PathBuf::from) {
        return if explicit.is_file() {
            Ok(vec![Candidate::File(explicit)])
        } else if explicit.is_dir() {
            let found = in_dir(&explicit);
            if found.is_empty() {
                Err(format!("{NVRTC_ENV}={} (a folder without {})", explicit.display(), SONAMES.join(" or ")))
            } else {
                Ok(found)
            }
        } else {
            Err(format!("{NVRTC_ENV}={} (does not exist)", explicit.display()))
        };
    }
    let mut out = Vec::new();
    let mut roots: Vec<PathBuf> = CUDA_ROOT_ENVS.iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    for root in roots {
        out.extend(in_dir(&root.join("lib64")));
    }
    out.extend(SONAMES.iter().map(|s| Candidate::Soname(s)));
    for cache in pio_models::paths::cache_dirs() {
        out.extend(in_dir(&cache.join("nvrtc")));
    }
    for dir in python_nvidia_dirs() {
        out.extend(in_dir(&dir));
    }
    Ok(out)
}

fn open(candidate: &Candidate) -> std::result::Result<libloading::Library, libloading::Error> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading libnvrtc runs its initializers, which have no preconditions.
    let lib = unsafe {
        match candidate {
            Candidate::File(p) => Library::open(Some(p), RTLD_NOW | RTLD_GLOBAL)?,
            Candidate::Soname(s) => Library::open(Some(*s), RTLD_NOW | RTLD_GLOBAL)?,
        }
    };
    Ok(lib.into())
}

fn version_of(lib: &libloading::Library) -> std::result::Result<(i32, i32), libloading::Error> {
    type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
    // SAFETY: nvrtcVersion's signature; it writes two ints.
    unsafe {
        let f = lib.get::<VersionFn>(b"nvrtcVersion\0")?;
        let (mut major, mut minor) = (0, 0);
        f(&mut major, &mut minor);
        Ok((major, minor))
    }
}

fn nvrtc_err(call: &'static str) -> impl Fn(nvrtc::NvrtcError) -> KernelError {
    move |e| KernelError::Nvrtc { call, code: format!("{:?}", e.0) }
}

impl Nvrtc {
    /// The process's NVRTC, found and loaded once.
    pub fn get() -> Result<&'static Nvrtc> {
        static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
        match NVRTC.get_or_init(Self::load) {
            Ok(n) => Ok(n),
            Err(searched) => Err(KernelError::NvrtcNotFound { searched: searched.clone(), env: NVRTC_ENV }),
        }
    }

    fn load() -> std::result::Result<Nvrtc, String> {
        let list = candidates()?;
        let mut tried = Vec::new();
        for c in &list {
            match open(c).and_then(|lib| version_of(&lib).map(|v| (lib, v))) {
                Ok((lib, version)) => {
                    let location = match c {
                        Candidate::File(p) => p.clone(),
                        Candidate::Soname(s) => PathBuf::from(s),
                    };
                    tracing::info!("NVRTC {}.{} from {}", version.0, version.1, location.display());
                    return Ok(Nvrtc { location, version, _lib: lib });
                }
                Err(e) => tried.push(format!("{} ({e})", c.describe())),
            }
        }
        if tried.is_empty() {
            tried.push("nothing (no candidate exists)".into());
        }
        Err(tried.join("; "))
    }

    /// Checks that `cudarc` reaches the library this process loaded (not another one on the path).
    fn check_cudarc(&self) -> Result<()> {
        // SAFETY: only reports whether one of cudarc's candidate names loads.
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::NvrtcMismatch {
                path: self.location.clone(),
                expected: self.version_string(),
                answered: "nothing: cudarc finds no libnvrtc by name".into(),
                env: NVRTC_ENV,
            });
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(nvrtc_err("nvrtcVersion"))?;
        if (major, minor) != self.version {
            return Err(KernelError::NvrtcMismatch {
                path: self.location.clone(),
                expected: self.version_string(),
                answered: format!("NVRTC {major}.{minor}"),
                env: NVRTC_ENV,
            });
        }
        Ok(())
    }

    pub fn version_string(&self) -> String {
        format!("NVRTC {}.{}", self.version.0, self.version.1)
    }

    /// The real architectures this NVRTC compiles for (`sm_XY` as XY).
    pub fn supported_archs(&self) -> Result<Vec<i32>> {
        self.check_cudarc()?;
        let mut n = 0;
        // SAFETY: writes one int, then fills a buffer of that many.
        unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }.result().map_err(nvrtc_err("nvrtcGetNumSupportedArchs"))?;
        let mut archs = vec![0; n.max(0) as usize];
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(nvrtc_err("nvrtcGetSupportedArchs"))?;
        Ok(archs)
    }

    /// Compiles `source` for `sm_<arch>` (e.g. 90) into a cubin, through the on-disk cache.
    /// `family` names the kernels in errors and cache files.
    pub fn cubin(&self, family: &str, source: &str, arch: i32) -> Result<Vec<u8>> {
        let options = compile_options(arch);
        let key = cache_key(source, &options, &self.version_string());
        let cached = cache_dir().map(|d| d.join(format!("{family}-sm{arch}-{key:016x}.cubin")));
        if let Some(path) = &cached {
            if let Ok(bytes) = std::fs::read(path) {
                tracing::debug!("kernels {family}: cached cubin {}", path.display());
                return Ok(bytes);
            }
        }
        let start = std::time::Instant::now();
        let cubin = self.compile(family, source, arch, &options)?;
        tracing::info!("kernels {family}: compiled for sm_{arch} in {:.1}s", start.elapsed().as_secs_f64());
        if let Some(path) = &cached {
            if let Err(e) = store(path, &cubin) {
                tracing::warn!("{e}; the kernels will be compiled again next time");
            }
        }
        Ok(cubin)
    }

    /// Compiles without the cache; `Ok` holds the cubin.
    pub fn compile(&self, family: &str, source: &str, arch: i32, options: &[String]) -> Result<Vec<u8>> {
        let supported = self.supported_archs()?;
        if !supported.contains(&arch) {
            return Err(KernelError::UnsupportedArch {
                version: self.version_string(),
                arch: format!("sm_{arch}"),
                supported: supported.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(", "),
            });
        }
        let src = CString::new(source).map_err(|_| KernelError::Compile {
            family: family.into(),
            arch: format!("sm_{arch}"),
            log: "the source holds a NUL byte".into(),
        })?;
        let name = CString::new(format!("{family}.cu")).unwrap_or_default();
        let prog = nvrtc::create_program(&src, Some(&name)).map_err(nvrtc_err("nvrtcCreateProgram"))?;
        // SAFETY: `prog` is live until destroyed below; `src` and `name` outlive it.
        let result = unsafe { nvrtc::compile_program(prog, options) };
        let log = unsafe { nvrtc::get_program_log(prog) }.map(c_chars_to_string).unwrap_or_default();
        let cubin = result.map_err(|_| KernelError::Compile {
            family: family.into(),
            arch: format!("sm_{arch}"),
            log: log.clone(),
        });
        let cubin = cubin.and_then(|()| {
            let mut size = 0usize;
            // SAFETY: reads the size, then fills a buffer of that size.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(nvrtc_err("nvrtcGetCUBINSize"))?;
            let mut bytes = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast::<c_char>()) }
                .result()
                .map_err(nvrtc_err("nvrtcGetCUBIN"))?;
            Ok(bytes)
        });
        // SAFETY: destroyed once.
        let _ = unsafe { nvrtc::destroy_program(prog) };
        if std::env::var_os("PIO_PTXAS_LOG").is_some() {
            eprintln!("{log}");
        }
        if cubin.is_ok() && !log.trim().is_empty() {
            tracing::debug!("NVRTC log for {family}:\n{log}");
        }
        cubin
    }
}

/// Options for a real-architecture cubin; no fast-math (the reductions keep IEEE semantics; the
/// one approximation, `__expf` in SiLU, is explicit in the source).
pub fn compile_options(arch: i32) -> Vec<String> {
    vec![format!("--gpu-architecture=sm_{arch}"), "-std=c++17".into(), "--restrict".into()]
}

fn c_chars_to_string(v: Vec<c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().take_while(|&c| c != 0).map(|c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// FNV-1a over the parts (a cache name, not a security boundary).
fn cache_key(source: &str, options: &[String], version: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in std::iter::once(source).chain(options.iter().map(String::as_str)).chain(std::iter::once(version)) {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Where compiled kernels are kept: `PIO_KERNEL_CACHE`, else `kernels/` under the project cache
/// (`PIO_CACHE_DIR` or `.cache/pio`), else `~/.cache/pio/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(KERNEL_CACHE_ENV) {
        return Some(PathBuf::from(dir));
    }
    if let Some(cache) = pio_models::paths::cache_dirs().into_iter().next() {
        return Some(cache.join("kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("pio").join("kernels"))
}

/// Writes `bytes` to `path` through a temporary file and a rename (no half-written cubin).
fn store(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let err = |source| KernelError::Cache { path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp =
        dir.join(format!(".{}.{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("cubin"), std::process::id()));
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_every_part() {
        let base = cache_key("src", &compile_options(90), "NVRTC 13.0");
        assert_eq!(base, cache_key("src", &compile_options(90), "NVRTC 13.0"));
        assert_ne!(base, cache_key("src2", &compile_options(90), "NVRTC 13.0"));
        assert_ne!(base, cache_key("src", &compile_options(80), "NVRTC 13.0"));
        assert_ne!(base, cache_key("src", &compile_options(90), "NVRTC 13.1"));
    }

    #[test]
    fn a_folder_is_searched_for_the_sonames_in_order() {
        let dir = tempfile::tempdir().unwrap();
        assert!(in_dir(dir.path()).is_empty());
        std::fs::write(dir.path().join("libnvrtc.so"), b"").unwrap();
        std::fs::write(dir.path().join("libnvrtc.so.13"), b"").unwrap();
        assert_eq!(
            in_dir(dir.path()),
            vec![Candidate::File(dir.path().join("libnvrtc.so.13")), Candidate::File(dir.path().join("libnvrtc.so"))]
        );
    }

    #[test]
    fn store_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("k.cubin");
        store(&path, b"one").unwrap();
        store(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }
}
