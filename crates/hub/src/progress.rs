//! Progress bars: one for the whole download, one for each file in flight; drawn on stderr
//! only when it is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub(crate) struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    /// Bytes done over all files (kept here so a file that starts over can take its bytes back).
    done: Arc<AtomicU64>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Bars {
    pub(crate) fn new(enabled: bool, total: u64, files: usize) -> Self {
        let target = if enabled && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(total));
        overall.set_style(style(
            "{msg:>32} [{bar:40}] {decimal_bytes}/{decimal_total_bytes} ({decimal_bytes_per_sec}, {eta} left)",
        ));
        overall.set_message(format!("{files} files"));
        Bars { multi, overall, done: Arc::new(AtomicU64::new(0)) }
    }

    /// A bar for one file; it implements hf-hub's progress interface.
    pub(crate) fn file(&self, name: &str) -> FileBar {
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(style("{msg:>32} [{bar:40}] {decimal_bytes}/{decimal_total_bytes}"));
        bar.set_message(short_name(name));
        FileBar { bar, overall: self.overall.clone(), done: self.done.clone(), position: 0 }
    }

    pub(crate) fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

pub(crate) struct FileBar {
    bar: ProgressBar,
    overall: ProgressBar,
    done: Arc<AtomicU64>,
    position: u64,
}

impl FileBar {
    fn add(&mut self, bytes: u64) {
        self.position += bytes;
        self.bar.set_position(self.position);
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.overall.set_position(done);
    }
}

/// The last 32 characters of a file name (shard names differ at their end).
fn short_name(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= 32 {
        name.to_string()
    } else {
        format!("..{}", chars[chars.len() - 30..].iter().collect::<String>())
    }
}

impl hf_hub::api::Progress for FileBar {
    /// (Re)starts the file at zero bytes: a transfer that starts over gives its bytes back.
    fn init(&mut self, size: usize, filename: &str) {
        self.done.fetch_sub(self.position, Ordering::Relaxed);
        self.position = 0;
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
        self.bar.set_message(short_name(filename));
    }

    fn update(&mut self, size: usize) {
        self.add(size as u64);
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for FileBar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
