//! The live progress bar: answered events, the rate over the last moment and its ack latency.
//! Hidden when stdout is not a terminal or with `--quiet`.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::stats::{Stats, format_ms};

/// How often the bar is redrawn.
const TICK: Duration = Duration::from_millis(500);

/// A progress bar, or nothing.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar on stdout, unless `quiet` or stdout is not a terminal.
    pub fn new(quiet: bool) -> Progress {
        let visible = !quiet && std::io::stdout().is_terminal();
        Progress { bar: visible.then(|| ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout())) }
    }

    /// No bar at all (tests, machine output).
    pub fn hidden() -> Progress {
        Progress { bar: None }
    }

    /// A line of text above the bar (or on stderr without one).
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Redraws from `stats` until the returned task is aborted or the bar is finished.
    pub fn watch(&self, stats: Arc<Stats>, total: Option<u64>) -> JoinHandle<()> {
        let Some(bar) = self.bar.clone() else {
            return tokio::spawn(async {});
        };
        let template = match total {
            Some(total) => {
                bar.set_length(total);
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}"
            }
            None => "{elapsed_precise} {spinner} {pos} answered {msg}",
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        tokio::spawn(async move {
            let mut previous = 0;
            let mut interval = tokio::time::interval(TICK);
            loop {
                interval.tick().await;
                let answered = stats.answered();
                let recent = stats.take_recent();
                let rate = (answered - previous) as f64 / TICK.as_secs_f64();
                previous = answered;
                bar.set_position(answered);
                let errors = stats.errors.load(std::sync::atomic::Ordering::Relaxed);
                bar.set_message(format!(
                    "{rate:>8.0} ev/s  ack p50 {}  p99 {}  errors {errors}",
                    format_ms(recent.p50_ms),
                    format_ms(recent.p99_ms)
                ));
            }
        })
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
