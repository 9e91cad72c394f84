//! `pio`'s log lines on stderr: ANSI colour codes on a terminal only, never in a file or a pipe,
//! and none when `NO_COLOR` is set (to anything but the empty string). The terminal is a
//! pseudo-terminal the test opens; the log line is the error of a graph folder that is not there
//! (no model is needed).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};

const ESC: u8 = 0x1b;

/// `pio run` on a missing graph folder: it logs one ERROR line and exits.
fn failing_run(tmp: &Path, no_color: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pio"));
    cmd.args(["run", "--graphs", tmp.join("missing").to_str().unwrap(), "--prompt-ids", "1,2"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match no_color {
        Some(value) => cmd.env("NO_COLOR", value),
        None => cmd.env_remove("NO_COLOR"),
    };
    cmd
}

/// What `cmd` writes to stderr when stderr is a terminal.
fn stderr_on_a_terminal(mut cmd: Command) -> Vec<u8> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("no pseudo-terminal");
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let terminal = File::options().read(true).write(true).open(name.to_str().unwrap()).unwrap();
    cmd.stderr(Stdio::from(terminal));
    let mut child = cmd.spawn().expect("cannot start pio");
    // The terminal's last open end is the child's: reading stops (EIO) once it exits.
    drop(cmd);
    let mut master = File::from(master);
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match master.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
    child.wait().unwrap();
    out
}

#[test]
fn log_lines_are_coloured_on_a_terminal_only_and_never_with_no_color() {
    let tmp = tempfile::tempdir().unwrap();
    // A pipe (as a file or `2>&1 | less` gets): plain text.
    let piped = failing_run(tmp.path(), None).stderr(Stdio::piped()).output().unwrap();
    assert!(!piped.status.success());
    let text = String::from_utf8_lossy(&piped.stderr);
    assert!(text.contains("ERROR") && text.contains("pio.json"), "{text}");
    assert!(!piped.stderr.contains(&ESC), "colour codes in piped logs: {text:?}");

    // A terminal: colour, unless NO_COLOR says otherwise (an empty NO_COLOR does not count).
    for (no_color, coloured) in [(None, true), (Some(""), true), (Some("1"), false)] {
        let out = stderr_on_a_terminal(failing_run(tmp.path(), no_color));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("ERROR") && text.contains("pio.json"), "NO_COLOR={no_color:?}: {text:?}");
        assert_eq!(out.contains(&ESC), coloured, "NO_COLOR={no_color:?}: {text:?}");
    }
}
