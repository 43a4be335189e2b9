//! Progress on stderr: an indicatif bar on a terminal; in a log file (stderr not a terminal)
//! a plain line at most every 30 s and at the end, so logs stay short and readable.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    name: String,
    len: u64,
    live: bool,
    quiet: bool,
    last_line: Instant,
    start: Instant,
}

/// Plain lines in logs come at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

impl Progress {
    /// A progress of `len` steps named `name`; `quiet` shows nothing at all.
    pub fn new(name: &str, len: u64, quiet: bool) -> Self {
        let target = ProgressDrawTarget::stderr();
        let live = !quiet && !target.is_hidden();
        let bar = ProgressBar::with_draw_target(Some(len), if live { target } else { ProgressDrawTarget::hidden() });
        if let Ok(style) = ProgressStyle::with_template("[{prefix}] [{bar:30}] {pos}/{len} {msg} ETA {eta}") {
            bar.set_style(style.progress_chars("#>-"));
        }
        bar.set_prefix(name.to_string());
        Progress { bar, name: name.into(), len, live, quiet, last_line: Instant::now(), start: Instant::now() }
    }

    /// Moves to `pos` with `msg` (e.g. the loss and the rate).
    pub fn update(&mut self, pos: u64, msg: String) {
        if self.live {
            self.bar.set_position(pos);
            self.bar.set_message(msg);
        } else if !self.quiet && (self.last_line.elapsed() >= LOG_EVERY || pos == self.len) {
            self.last_line = Instant::now();
            eprintln!("[{}] {pos}/{} {msg} ({:.0} s)", self.name, self.len, self.start.elapsed().as_secs_f64());
        }
    }

    /// Prints a line above the bar (or plainly in a log).
    pub fn println(&self, line: &str) {
        if self.live {
            self.bar.println(line);
        } else if !self.quiet {
            eprintln!("{line}");
        }
    }

    /// Ends the bar; in a log, one final line with the elapsed time.
    pub fn finish(self, msg: String) {
        if self.live {
            self.bar.finish_with_message(msg);
        } else if !self.quiet {
            eprintln!("[{}] {}/{} {msg} ({:.1} s)", self.name, self.bar.position(), self.len, self.start.elapsed().as_secs_f64());
        }
    }
}
