//! Logging for the binaries: [`tracing`] events to stderr, or to the journal when stderr
//! is the journal (systemd says so in `JOURNAL_STREAM`), filtered by `-v`/`-q` or
//! `RUST_LOG`; and [`LinkWatch`], which logs what happened to a link from the changes of
//! its [`Endpoint::stats`], once per change rather than once per frame.
//!
//! Lines carry no timestamp: the journal stamps its own, and a person at a terminal reads
//! them as they come.

use ivring::{Endpoint, Stats};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::{debug, info, warn, Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// `-v`/`-q` for a binary's command line (global: given before or after the subcommand).
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct Verbosity {
    /// More log detail: -v debug, -vv trace. `RUST_LOG` (e.g. `debug`,
    /// `ivring_ivshmem=trace`) overrides both flags.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less: -q warnings and errors only, -qq errors only.
    #[arg(short, long, action = clap::ArgAction::Count, global = true,
          conflicts_with = "verbose")]
    pub quiet: u8,
}

impl Verbosity {
    /// The level the flags ask for (info without either).
    pub fn level(&self) -> LevelFilter {
        match i16::from(self.verbose) - i16::from(self.quiet) {
            i16::MIN..=-2 => LevelFilter::ERROR,
            -1 => LevelFilter::WARN,
            0 => LevelFilter::INFO,
            1 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        }
    }
}

/// Whether stderr is the journal: `JOURNAL_STREAM` holds the device and inode of the
/// stream systemd connected, and they match stderr's (not some inherited value).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Installs the logger of binary `bin`. `RUST_LOG`, when set, decides the levels (a
/// malformed one is reported and the flags' level used).
pub fn init(bin: &'static str, verbosity: Verbosity) {
    let (filter, bad_env) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match spec.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                Targets::new().with_default(verbosity.level()),
                Some(format!("RUST_LOG={spec:?} ignored: {e}")),
            ),
        },
        _ => (Targets::new().with_default(verbosity.level()), None),
    };
    let journal = stderr_is_journal()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    let registry = tracing_subscriber::registry().with(filter);
    // Two branches rather than optional layers: an absent layer's level hint would cap
    // the others'.
    let _ = match journal {
        Some(journal) => registry
            .with(journal.with_syslog_identifier(bin.to_string()))
            .try_init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(Plain { bin }),
            )
            .try_init(),
    };
    if let Some(why) = bad_env {
        warn!("{why}");
    }
}

/// `BIN: message field=value`, with `warning:`, `error:` or `debug:` before the message
/// for those levels: the shape of the binaries' other lines.
struct Plain {
    bin: &'static str,
}

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            Level::INFO => "",
            Level::DEBUG => "debug: ",
            Level::TRACE => "trace: ",
        };
        write!(w, "{}: {level}", self.bin)?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Logs what happened to one link between two looks at it: up and down, resets of the
/// link (with the reason), corruption by the peer, refused and reset sessions.
#[derive(Debug)]
pub struct LinkWatch {
    link: String,
    last: Stats,
    up: Option<bool>,
}

impl LinkWatch {
    /// A watch over the link named `link` in every line (a socket, file or device).
    pub fn new(link: impl Into<String>) -> LinkWatch {
        LinkWatch {
            link: link.into(),
            last: Stats::default(),
            up: None,
        }
    }

    /// Looks at `ep` and logs each change since the last look once.
    pub fn poll(&mut self, ep: &Endpoint) {
        let link = self.link.as_str();
        let now = ep.stats();
        let last = std::mem::replace(&mut self.last, now.clone());
        let more = |new: u64, old: u64| new.saturating_sub(old);
        let reason = now.last_error.as_deref().unwrap_or("unknown");
        // The link is named in the text, not only as a field: journalctl shows the text.
        let n = more(now.corruptions, last.corruptions);
        if n > 0 {
            warn!(
                count = n,
                reason, "{link}: the other side corrupted the shared ring"
            );
        }
        let n = more(now.link_resets, last.link_resets);
        if n > 0 {
            warn!(
                count = n,
                reason, "{link}: link reset: every open session failed"
            );
        }
        let n = more(now.session_resets, last.session_resets);
        if n > 0 {
            info!(count = n, "{link}: sessions reset by the other side");
        }
        let n = more(now.opens_refused, last.opens_refused);
        if n > 0 {
            info!(
                count = n,
                "{link}: session opens refused (nothing listens on the port, or a backlog or \
                 session limit)"
            );
        }
        let n = more(now.frames_dropped, last.frames_dropped);
        if n > 0 {
            debug!(count = n, "{link}: frames for sessions not open dropped");
        }
        let n = more(now.late_wakeups, last.late_wakeups);
        if n > 0 {
            debug!(
                count = n,
                "{link}: blocked calls or callbacks woken by a 100 ms limit, not by \
                 the event they waited for (a slow or silent doorbell)"
            );
        }
        let up = ep.is_up();
        if self.up != Some(up) {
            if up {
                info!("{link}: link up");
            } else if self.up.is_some() {
                info!("{link}: link down: waiting for the other side");
            } else {
                info!("{link}: waiting for the other side");
            }
            self.up = Some(up);
        }
    }

    /// Polls `ep` every `period` until `stop` is set.
    pub fn run(&mut self, ep: &Endpoint, period: Duration, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.poll(ep);
            std::thread::sleep(period);
        }
    }
}

/// How often the binaries look at their links: the heartbeat period's order.
pub const WATCH_PERIOD: Duration = Duration::from_millis(200);
