//! Command-line flags, and their validation into a [`Config`].

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, ValueEnum};

use crate::checks::Check;

const EXAMPLES: &str = "\
Examples:
  tracer --pid $(pgrep -o nginx)              trace nginx and its workers until Ctrl-C
  tracer --pid 1234 --duration 30s            30 seconds, then print the report
  tracer --port 8080 --interval 10s           whoever accepts on port 8080, a report every 10 s
  tracer --cgroup /system.slice/app.service   every process of a cgroup, now and later
  tracer --pid 1234 --metrics-addr 127.0.0.1:9464   Prometheus metrics at /metrics
  tracer --pid 1234 --connections             also one line per connection as it closes
  tracer --pid 1234 --output json > out.json  JSON lines (see README for the fields)
  tracer --pid 1234 --slow 200ms              one line per request slower than 200 ms
  tracer --pid 1234 --labels                  per endpoint, query or command (HTTP route,
                                              SQL statement and table, Redis command)
  tracer doctor                               what this kernel offers: hooks and phases
  tracer --duration 60s --check 'think.p99<50ms' --check 'listen_drops==0' -- ./server
                                              run ./server traced for 60 s; exit 1 if a
                                              check fails (CI)

Checks: PHASE.STAT OP DURATION or COUNTER OP NUMBER, optionally scoped:
  think[:8080].p99<50ms  upstream[10.0.0.5:5432].p50<5ms  lost_events==0
  with --labels: think[:8080 \"GET /products\"].p99<50ms  requests[\"GET /products\"]>=10
  STAT: count mean p50 p90 p99 p99.9 max; OP: < <= > >= == !=
Exit status: 0 all checks hold, 1 a check failed (or the traced command did),
2 usage or set-up error.

Phases: handshake, accept_wait, tls, recv_wait, think, send, delivery; upstream peers:
connect, tls, upstream (see README).
Needs root, or CAP_BPF and CAP_PERFMON, and a kernel with BTF.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Where does a server's time go? Per-connection and per-request phases measured in
/// the kernel with eBPF, for a running process, without a proxy or packet capture.
#[derive(Debug, Parser)]
#[command(name = "tracer", version, after_help = EXAMPLES)]
pub struct Args {
    /// Trace this process and its descendants (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Trace connections accepted on this local port, by any process (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,

    /// Trace every process that accepts TCP connections on this host, in every network
    /// namespace (containers' too), each listener reported with its processes: the
    /// mode of a node agent.
    #[arg(long)]
    pub all: bool,

    /// Trace the processes of this cgroup (v2) and of the cgroups below it, now and
    /// later, including processes moved into it (repeatable): a directory of the
    /// cgroup hierarchy, or a path as /proc/PID/cgroup shows it.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,

    /// Trace the processes of this container (repeatable): its ID or a prefix of 12 or
    /// more characters; its cgroup is found as Docker, containerd, CRI-O and Podman name
    /// theirs.
    #[arg(long = "container", value_name = "ID")]
    pub containers: Vec<String>,

    /// Stop after this long (e.g. 30s, 500ms, 2m) and print the final report.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Also print a report every DURATION.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub interval: Option<Duration>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Print one line per traced connection when it closes.
    #[arg(long)]
    pub connections: bool,

    /// Size of the kernel-to-user ring buffer in bytes (a power of two, ≥ 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    pub ring_buffer_size: u32,

    /// Connections tracked at once; more are counted as untracked.
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_sockets: u32,

    /// A budget to check on the final report, e.g. 'think.p99<50ms' or 'listen_drops==0'
    /// (repeatable; see below). The exit status is 1 when one fails.
    #[arg(long = "check", value_name = "EXPR", value_parser = parse_check)]
    pub checks: Vec<Check>,

    /// Fewest samples a phase statistic needs for its check to be judged; with fewer
    /// the check fails.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub min_samples: u64,

    /// Print every request (and connection setup, and TLS handshake) slower than DURATION,
    /// phase by phase.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub slow: Option<Duration>,

    /// Label requests by endpoint, query or command — HTTP method and route, PostgreSQL
    /// statement kind and table, Redis command — from the first bytes of each request
    /// and response (copied from the application's buffers, never kept: see README),
    /// and report every label's requests and phases.
    #[arg(long)]
    pub labels: bool,

    /// An HTTP route for labels, e.g. '/products/{id}': a path matching it is labelled
    /// with the pattern (repeatable; implies --labels). Other paths fold identifier-like
    /// segments into {id}.
    #[arg(long = "route", value_name = "PATTERN")]
    pub routes: Vec<String>,

    /// Labels kept per listener and per upstream peer; requests with further labels are
    /// counted under 'other'.
    #[arg(long, value_name = "N", default_value_t = crate::endpoints::DEFAULT_MAX_LABELS)]
    pub max_labels: usize,

    /// Serve Prometheus metrics at http://ADDR/metrics while tracing (e.g.
    /// 127.0.0.1:9464): histograms of every phase and the counters (see README).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// With --metrics-addr: offer native histograms too. A scraper that asks for the
    /// Prometheus protobuf format (Prometheus with --enable-feature=native-histograms)
    /// gets each histogram with native buckets (8 per power of two, ~9% wide) beside the
    /// classic ones; any other still gets the text format.
    #[arg(long, requires = "metrics_addr")]
    pub native_histograms: bool,

    /// Do not use this kind of hook (tp_btf, raw_tp, tracepoint, fentry, lsm, kprobe,
    /// cgroup_sock_addr, cgroup_skb, uprobe; repeatable or comma-separated): each kernel hook then uses its next
    /// implementation, as on a kernel without that kind, and without uprobes TLS is
    /// followed from its records alone (`tracer doctor` takes it too).
    #[arg(long, value_name = "KIND", value_delimiter = ',')]
    pub skip_hook_kind: Vec<crate::compat::Kind>,

    /// Do not attach this hook (a kernel program name, e.g. tcp_probe): runs as on a
    /// kernel without it, for testing.
    #[arg(long, value_name = "PROGRAM", hide = true)]
    pub disable_hook: Vec<String>,

    /// Log what the tracer does (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Run this command and trace it, with its descendants, from its first instruction;
    /// stop when it exits (or at --duration, stopping it).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The whole chain of causes, so the message says what is wrong and where.
fn parse_check(text: &str) -> Result<Check, String> {
    crate::checks::parse(text).map_err(|e| format!("{e:#}"))
}

/// Parses `250ms`, `1.5s`, `2m`, `1h`, `800us`, `10ns`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().with_context(|| format!("'{text}' is not a duration like 250ms, 1.5s or 2m"))?;
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => bail!("unknown unit '{other}' in '{text}' (use ns, us, ms, s, m or h)"),
    };
    Ok(Duration::from_secs_f64(value * scale))
}

impl Args {
    pub fn validate(&self) -> Result<()> {
        let by_cgroup = !self.cgroups.is_empty() || !self.containers.is_empty();
        if self.all && (by_cgroup || !self.pids.is_empty() || !self.ports.is_empty() || !self.command.is_empty()) {
            bail!("--all traces every server here: leave out --pid, --port, --cgroup, --container and the command");
        }
        if !self.command.is_empty() && (!self.pids.is_empty() || !self.ports.is_empty() || by_cgroup) {
            bail!("-- COMMAND traces the command it starts: leave out --pid, --port, --cgroup and --container");
        }
        if self.pids.is_empty() && self.ports.is_empty() && !by_cgroup && self.command.is_empty() && !self.all {
            bail!("nothing to trace: give --pid PID, --port PORT, --cgroup PATH, --container ID or -- COMMAND (see --help)");
        }
        if by_cgroup && (!self.pids.is_empty() || !self.ports.is_empty()) {
            bail!("--cgroup (or --container), --pid and --port are alternatives: give one of them");
        }
        if self.ports.contains(&0) {
            bail!("--port 0: no socket ever listens on port 0; give the port your server listens on");
        }
        if !self.pids.is_empty() && !self.ports.is_empty() {
            bail!("--pid and --port are alternatives: give one of them");
        }
        if self.ring_buffer_size < 4096 || !self.ring_buffer_size.is_power_of_two() {
            bail!("--ring-buffer-size must be a power of two of at least 4096, not {}", self.ring_buffer_size);
        }
        if self.max_sockets == 0 {
            bail!("--max-sockets must be at least 1");
        }
        if self.interval.is_some_and(|i| i.is_zero()) {
            bail!("--interval must be longer than zero");
        }
        if self.max_labels == 0 {
            bail!("--max-labels must be at least 1");
        }
        crate::labels::Routes::parse(&self.routes).context("in --route")?;
        Ok(())
    }

    /// Whether requests are labelled.
    pub fn labels_on(&self) -> bool {
        self.labels || !self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("800us").unwrap(), Duration::from_micros(800));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5parsecs").is_err());
    }
}
