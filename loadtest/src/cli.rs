//! The command line of `tally-load`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::generator::{GeneratorConfig, Mix};
use crate::load::Mode;

/// Load generator and end-to-end verifier for Tally.
///
/// Without a subcommand: drive an edge (`--spawn` one, or a running one) open-loop at `--rate`
/// events/s, or as fast as it acknowledges, for `--duration` and/or `--events`; then verify what
/// was acknowledged against what the database holds (PostgreSQL, or SQLite with `--embedded`).
#[derive(Debug, Parser)]
#[command(name = "tally-load", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure the raw binary COPY ceiling and the full ingest path with the same events on the
    /// same (spawned) server, and print their ratio, bytes per event and the CPU split.
    /// PostgreSQL only: there is no `--embedded` here.
    Ratio(RatioArgs),
}

/// A load run.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// How events travel: the binary protocol, HTTP batches or one HTTP request per event.
    #[arg(long, value_enum, default_value_t = Mode::Binary)]
    pub mode: Mode,
    /// Connections (each uses tenant `i % tenants`); must be at least the number of tenants.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Events per batch (binary and http-batch; the edge takes at most 1,000 per HTTP batch by default).
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// How long to send, e.g. 20s, 500ms, 2m. Default 10s when --events is not given either.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Events to send in all.
    #[arg(long)]
    pub events: Option<u64>,
    /// Target events per second, open loop (latency counts from the intended send time).
    /// Without it: as fast as the edge acknowledges.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Unanswered batches per binary connection.
    #[arg(long, default_value_t = 8)]
    pub max_in_flight: usize,
    #[command(flatten)]
    pub events_shape: EventArgs,
    /// Verify against the database after the run (default with --spawn; needs --database-url otherwise).
    #[arg(long)]
    pub verify: bool,
    /// Skip verification.
    #[arg(long)]
    pub no_verify: bool,
    /// Verify only after the run, not also halfway through it. The midway check reads every raw
    /// event of the run in one snapshot while events still arrive; a latency measurement would
    /// see that read in its tail.
    #[arg(long)]
    pub no_midway_check: bool,
    /// Exit non-zero if the achieved rate is below this many events/s.
    #[arg(long)]
    pub fail_under: Option<f64>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where the edge is.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Start a throwaway PostgreSQL and a `tally-edge` child (found next to this executable),
    /// with tenants and keys; all removed on exit.
    #[arg(long)]
    pub spawn: bool,
    /// With --spawn: no PostgreSQL; the edge stores into its embedded SQLite backend in a
    /// temporary data directory, and verification reads that file. Not with --pg-durable,
    /// --pg-socket or --database-url.
    #[arg(long)]
    pub embedded: bool,
    /// Binary protocol address of a running edge.
    #[arg(long, env = "TALLY_WIRE_ADDR", default_value = "127.0.0.1:7000")]
    pub wire_addr: String,
    /// HTTP address of a running edge.
    #[arg(long, env = "TALLY_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: String,
    /// API keys of a running edge, one per tenant (repeat the flag or separate with commas).
    #[arg(long, env = "TALLY_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,
    /// PostgreSQL of a running edge, for verification.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Allow non-loopback addresses.
    #[arg(long)]
    pub allow_remote: bool,
    /// Tenants to create with --spawn.
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// The `tally-edge` binary for --spawn (default: next to this executable).
    #[arg(long)]
    pub edge_bin: Option<PathBuf>,
    /// An extra flag for the spawned `tally-edge`, e.g. --edge-arg=--sink-workers=4 (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub edge_arg: Vec<String>,
    /// Turn fsync, synchronous_commit and full_page_writes on in the spawned PostgreSQL (the test
    /// harness turns them off).
    #[arg(long)]
    pub pg_durable: bool,
    /// Connect the spawned edge to PostgreSQL over its Unix socket instead of TCP.
    #[arg(long)]
    pub pg_socket: bool,
}

/// The traffic.
#[derive(Debug, Args)]
pub struct EventArgs {
    /// Distinct users per tenant.
    #[arg(long, default_value_t = 1000)]
    pub users: u32,
    /// Distinct LLM models.
    #[arg(long, default_value_t = 4)]
    pub models: u32,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of deliberate resends (same event id and timestamp): expected duplicates.
    /// Default 0.001 for runs, 0 for ratio.
    #[arg(long)]
    pub resend_fraction: Option<f64>,
    /// Share of deliberately invalid events (negative quantity, missing model): expected
    /// rejections. Default 0.001 for runs, 0 for ratio.
    #[arg(long)]
    pub invalid_fraction: Option<f64>,
    /// Traffic mix in parts, e.g. llm=50,document=15,api=25,custom=10 (the default).
    #[arg(long, value_parser = Mix::parse)]
    pub mix: Option<Mix>,
}

impl EventArgs {
    /// The generator's settings, with these fraction defaults where no flag was given.
    pub fn generator(&self, resend_default: f64, invalid_default: f64) -> Result<GeneratorConfig, String> {
        let resend_fraction = self.resend_fraction.unwrap_or(resend_default);
        let invalid_fraction = self.invalid_fraction.unwrap_or(invalid_default);
        let valid = |fraction: f64| (0.0..=1.0).contains(&fraction);
        if !valid(resend_fraction) || !valid(invalid_fraction) || resend_fraction + invalid_fraction > 1.0 {
            return Err(
                "--resend-fraction and --invalid-fraction must be from 0 to 1, together at most 1".into()
            );
        }
        Ok(GeneratorConfig {
            seed: self.seed,
            users: self.users.max(1),
            models: self.models.max(1),
            resend_fraction,
            invalid_fraction,
            mix: self.mix.unwrap_or_default(),
            ..GeneratorConfig::default()
        })
    }
}

/// Output settings.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// No progress bar (it is also hidden when stdout is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `tally-load ratio`.
#[derive(Debug, Args)]
pub struct RatioArgs {
    /// Spawn PostgreSQL and the edge (the only way this benchmark runs: it needs two fresh
    /// databases on one server).
    #[arg(long)]
    pub spawn: bool,
    /// Events in each phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Binary connections of the full path.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Events per batch of the full path.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Unanswered batches per connection.
    #[arg(long, default_value_t = 8)]
    pub max_in_flight: usize,
    /// Tenants.
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// The `tally-edge` binary (default: next to this executable).
    #[arg(long)]
    pub edge_bin: Option<PathBuf>,
    /// An extra flag for the spawned `tally-edge` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub edge_arg: Vec<String>,
    /// Durable PostgreSQL: fsync, synchronous_commit and full_page_writes on. The default here,
    /// since a published throughput is a durable one; the flag is kept for older command lines.
    #[arg(long, conflicts_with = "pg_fast")]
    pub pg_durable: bool,
    /// Turn fsync, synchronous_commit and full_page_writes off (as the test harness does), for a
    /// quick comparison that is not a durable figure.
    #[arg(long)]
    pub pg_fast: bool,
    /// Connect the edge and the raw COPY writers over PostgreSQL's Unix socket instead of TCP.
    #[arg(long)]
    pub pg_socket: bool,
    #[command(flatten)]
    pub events_shape: EventArgs,
    /// Skip verifying the full path's database.
    #[arg(long)]
    pub no_verify: bool,
    /// Load `pg_stat_statements` (a server restart before the run) and print where the full
    /// path's statement time went, per statement and per event.
    #[arg(long)]
    pub statements: bool,
    /// Exit non-zero if the ratio is below this.
    #[arg(long)]
    pub fail_under_ratio: Option<f64>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `20s`, `500ms`, `2m`, `1h`, or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 20s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 days").is_err());
    }

    #[test]
    fn the_ci_command_line_parses() {
        let cli = Cli::try_parse_from([
            "tally-load",
            "--spawn",
            "--duration",
            "20s",
            "--rate",
            "10000",
            "--fail-under",
            "10000",
        ])
        .expect("parses");
        assert!(cli.command.is_none() && cli.run.target.spawn);
        assert_eq!(cli.run.duration, Some(Duration::from_secs(20)));
        assert_eq!(cli.run.mode, Mode::Binary);
        let ratio =
            Cli::try_parse_from(["tally-load", "ratio", "--spawn", "--events", "1000000"]).expect("parses");
        assert!(matches!(
            ratio.command,
            Some(Command::Ratio(RatioArgs { events: 1_000_000, spawn: true, .. }))
        ));
        let edge_args =
            Cli::try_parse_from(["tally-load", "--spawn", "--edge-arg=--sink-workers=4"]).expect("parses");
        assert_eq!(edge_args.run.target.edge_arg, ["--sink-workers=4"]);
    }

    #[test]
    fn fractions_are_checked() {
        let cli =
            Cli::try_parse_from(["tally-load", "--resend-fraction", "0.7", "--invalid-fraction", "0.5"])
                .expect("parses");
        assert!(cli.run.events_shape.generator(0.0, 0.0).is_err());
        let cli = Cli::try_parse_from(["tally-load"]).expect("parses");
        let config = cli.run.events_shape.generator(0.001, 0.002).expect("defaults are valid");
        assert_eq!((config.resend_fraction, config.invalid_fraction), (0.001, 0.002));
    }
}
