//! Hidden scratch folders beside an output (`.pio-export-<pid>-*` for graphs,
//! `.pio-synthetic-<pid>-*` for synthetic checkpoints): the output is written there and renamed
//! into place at the end, so an output folder is either complete or absent.
//!
//! A failed run removes its scratch folder (on drop); Ctrl-C, SIGTERM and SIGHUP remove it too
//! once [`clean_up_on_signals`] is installed; one left by a killed process (SIGKILL, power
//! loss) is removed by the next run writing beside it, once the process id in its name is gone.
//! An existing output is replaced only if it is of the same kind (an earlier pio-export output
//! with its `pio.json`, or a synthetic checkpoint with its marker), never any other folder.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tempfile::TempDir;

use crate::error::fs_error;
pub use crate::error::OutputError;

type Result<T> = std::result::Result<T, OutputError>;

/// Scratch folders of this process that a signal must remove.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The marker a synthetic checkpoint carries, so that only such a folder is ever replaced by a
/// new one.
pub const SYNTHETIC_MARKER: &str = "pio-synthetic.json";

/// What is being written, which decides the scratch folder's name and what it may replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A graph folder (replaceable: a folder with `pio.json`).
    Export,
    /// A synthetic checkpoint (replaceable: a folder with [`SYNTHETIC_MARKER`]).
    SyntheticCheckpoint,
}

impl OutputKind {
    fn prefix(self) -> &'static str {
        match self {
            OutputKind::Export => ".pio-export-",
            OutputKind::SyntheticCheckpoint => ".pio-synthetic-",
        }
    }

    fn marker(self) -> &'static str {
        match self {
            OutputKind::Export => pio_models::manifest::MANIFEST_FILE,
            OutputKind::SyntheticCheckpoint => SYNTHETIC_MARKER,
        }
    }

    /// Refuses a `dest` that exists unless `replace` is set and it is an output of this kind.
    pub fn check_destination(self, dest: &Path, replace: bool) -> Result<()> {
        // A folder made empty for the output (`mkdir out`, a temporary folder) holds nothing to lose.
        let empty_dir = dest.symlink_metadata().is_ok_and(|m| m.is_dir())
            && std::fs::read_dir(dest).is_ok_and(|mut entries| entries.next().is_none());
        if empty_dir && is_mount_point(dest) {
            // Checked before any work: the rename at the end would fail after all of it.
            return Err(OutputError::MountPoint { dest: dest.to_path_buf() });
        }
        if dest.symlink_metadata().is_err() || empty_dir {
            return Ok(());
        }
        let dest = dest.to_path_buf();
        match self {
            OutputKind::Export if !replace => Err(OutputError::Exists { dest }),
            _ if dest.is_dir() && dest.join(self.marker()).is_file() => Ok(()),
            OutputKind::Export => Err(OutputError::NotAnExport { dest }),
            OutputKind::SyntheticCheckpoint => Err(OutputError::NotASyntheticCheckpoint { dest }),
        }
    }
}

/// Whether the folder `dir` is on another filesystem than its parent (a mount point, such as a
/// container's volume).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (std::fs::metadata(dir), std::fs::metadata(parent)) {
        (Ok(d), Ok(p)) => d.dev() != p.dev(),
        _ => false,
    }
}

/// A scratch folder of this process, removed on drop and on a signal.
pub struct ScratchDir {
    dir: TempDir,
    kind: OutputKind,
    /// The folder opened with an exclusive `flock` for as long as this process writes it: a
    /// process id alone does not tell a gone process from one in another PID namespace (another
    /// container on a shared volume), and [`remove_stale`] leaves a locked folder alone.
    _lock: Option<std::fs::File>,
}

/// The folder at `path` opened and locked (exclusive, without waiting); None when it cannot be
/// opened or locked (held elsewhere, or a filesystem without locks).
fn lock_folder(path: &Path) -> Option<std::fs::File> {
    let folder = std::fs::File::open(path).ok()?;
    rustix::fs::flock(&folder, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(folder)
}

impl ScratchDir {
    /// Creates `<parent>/.pio-<kind>-<pid>-XXXXXX`, after removing stale ones in `parent`.
    pub fn new_in(parent: &Path, kind: OutputKind) -> Result<Self> {
        std::fs::create_dir_all(parent).map_err(fs_error("create folder", parent))?;
        remove_stale(parent);
        let mut live = live();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{}-", kind.prefix(), std::process::id()))
            .tempdir_in(parent)
            .map_err(fs_error("write to folder", parent))?;
        live.push(dir.path().to_path_buf());
        let lock = lock_folder(dir.path());
        Ok(ScratchDir { dir, kind, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the finished folder to `dest`. An existing `dest` (which must pass
    /// [`OutputKind::check_destination`]) is first moved into a scratch folder of its own, so
    /// the swap leaves either the old or the new output in place, never neither.
    pub fn persist(self, dest: &Path, replace: bool) -> Result<()> {
        self.kind.check_destination(dest, replace)?;
        // The contents reach the disk before the rename that publishes them: after a power cut
        // the output is then the old one or a complete new one, never an empty pio.json.
        sync_tree(self.path())?;
        let parent = self.dir.path().parent().unwrap_or(Path::new("."));
        let previous = if dest.symlink_metadata().is_ok() {
            let holder = ScratchDir::new_in(parent, self.kind)?;
            std::fs::rename(dest, holder.path()).map_err(|source| OutputError::Rename {
                from: dest.to_path_buf(),
                to: holder.path().to_path_buf(),
                source,
            })?;
            Some(holder)
        } else {
            None
        };
        if let Err(source) = std::fs::rename(self.path(), dest) {
            if let Some(holder) = &previous {
                let _ = std::fs::rename(holder.path(), dest);
            }
            return Err(OutputError::Rename { from: self.path().to_path_buf(), to: dest.to_path_buf(), source });
        }
        sync_folder(parent)?;
        Ok(())
    }
}

/// Flushes every file under `dir`, and the folders themselves, to disk.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(fs_error("read folder", dir))? {
        let entry = entry.map_err(fs_error("read folder", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(fs_error("read folder", dir))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            std::fs::File::open(&path).and_then(|f| sync_if_supported(&f)).map_err(fs_error("flush to disk", &path))?;
        }
    }
    sync_folder(dir)
}

/// Flushes a folder's entries to disk.
fn sync_folder(dir: &Path) -> Result<()> {
    Ok(std::fs::File::open(dir).and_then(|f| sync_if_supported(&f)).map_err(fs_error("flush to disk", dir))?)
}

/// `sync_all`, with a filesystem that cannot sync at all (some network and FUSE ones answer
/// EINVAL or ENOTSUP) taken at its word: there is nothing more to flush there. Any other error
/// (EIO, a full disk or quota showing late) is one.
pub(crate) fn sync_if_supported(file: &std::fs::File) -> std::io::Result<()> {
    match file.sync_all() {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::Unsupported | std::io::ErrorKind::InvalidInput) => Ok(()),
        result => result,
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // TempDir removes the folder (or finds it renamed away); it only leaves the registry.
        live().retain(|p| p != self.dir.path());
    }
}

/// Removes `path` even while another thread is still writing files into it.
fn remove_tree(path: &Path) {
    for _ in 0..5 {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => std::thread::yield_now(),
            _ => return,
        }
    }
}

/// Whether a process with this id exists (one of another user counts as existing).
fn process_exists(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        Some(pid) => !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH)),
        None => true,
    }
}

/// Removes scratch folders in `parent` whose process is gone and that no process holds locked
/// (see [`ScratchDir`]). Folders of running processes, and names without a process id, are
/// left alone.
pub fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) =
            [OutputKind::Export, OutputKind::SyntheticCheckpoint].iter().find_map(|k| name.strip_prefix(k.prefix()))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid as u32 == std::process::id() || process_exists(pid) {
            continue;
        }
        // Held while removing, so that it is this run's to remove.
        let Some(_held) = lock_folder(&entry.path()) else { continue };
        tracing::info!("removing {} left by an interrupted pio-export (process {pid})", entry.path().display());
        remove_tree(&entry.path());
    }
}

/// On SIGINT, SIGTERM or SIGHUP: removes this process's scratch folders, then dies of the
/// signal as it would have without the handler.
pub fn clean_up_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(OutputError::Signals)?;
    std::thread::Builder::new()
        .name("pio-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // The registry stays locked: no new scratch folder appears while we exit.
                let live = live();
                for path in live.iter() {
                    remove_tree(path);
                }
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            }
        })
        .map_err(OutputError::Signals)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_flushed_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("stage-1")).unwrap();
        std::fs::write(dir.path().join("pio.json"), "{}").unwrap();
        std::fs::write(dir.path().join("stage-1").join("model.onnx"), "x").unwrap();
        sync_tree(dir.path()).unwrap();
        let missing = dir.path().join("gone");
        let err = sync_tree(&missing).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn only_scratch_folders_of_gone_processes_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        let names = [
            format!(".pio-export-{gone}-abc"),
            format!(".pio-synthetic-{gone}-abc"),
            format!(".pio-export-{mine}-abc"),
            ".pio-export-1-abc".to_string(),  // init: always running
            ".pio-export-XyZ123".to_string(), // an older name without a process id
            "graphs".to_string(),
        ];
        for n in &names {
            std::fs::create_dir(parent.path().join(n)).unwrap();
        }
        // A folder whose process id is gone here but which a process elsewhere (another PID
        // namespace) holds locked is left alone.
        let elsewhere = parent.path().join(format!(".pio-export-{gone}-held"));
        std::fs::create_dir(&elsewhere).unwrap();
        let held = lock_folder(&elsewhere).unwrap();
        remove_stale(parent.path());
        assert!(elsewhere.is_dir(), "a locked scratch folder was removed");
        drop(held);
        std::fs::remove_dir(&elsewhere).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        let mut expected = names[2..].to_vec();
        expected.sort();
        assert_eq!(left, expected);
    }

    #[test]
    fn a_mount_point_is_told_apart_from_a_folder() {
        let root = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(root.path()));
        // /proc is a filesystem of its own wherever Linux mounts it.
        if Path::new("/proc/self").exists() {
            assert!(is_mount_point(Path::new("/proc")));
        }
    }

    #[test]
    fn replacing_an_output_needs_its_marker() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("precious.txt"), "keep").unwrap();
        let err = OutputKind::Export.check_destination(&dest, false).unwrap_err().to_string();
        assert!(err.contains("already exists (pass --force"), "{err}");
        let err = OutputKind::Export.check_destination(&dest, true).unwrap_err().to_string();
        assert!(err.contains("--force replaces only an earlier pio-export output"), "{err}");
        let err = OutputKind::SyntheticCheckpoint.check_destination(&dest, true).unwrap_err().to_string();
        assert!(err.contains("not a synthetic checkpoint"), "{err}");

        let scratch = ScratchDir::new_in(root.path(), OutputKind::Export).unwrap();
        std::fs::write(scratch.path().join("pio.json"), "{}").unwrap();
        assert!(scratch.persist(&dest, true).is_err());
        assert_eq!(std::fs::read_to_string(dest.join("precious.txt")).unwrap(), "keep");

        std::fs::write(dest.join("pio.json"), "{}").unwrap();
        let scratch = ScratchDir::new_in(root.path(), OutputKind::Export).unwrap();
        std::fs::write(scratch.path().join("new"), "").unwrap();
        scratch.persist(&dest, true).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["out"], "no scratch folder left");
        assert!(dest.join("new").exists() && !dest.join("precious.txt").exists());
    }
}
