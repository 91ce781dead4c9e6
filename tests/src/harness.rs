//! Helpers for the privileged integration tests: start the lab server and the tracer as
//! child processes, stop the tracer like a user would (SIGINT), and read its JSON.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ChildStderr, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::netns::Netns;

/// The workspace's target directory of the profile the tests were built with.
fn target_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.parent().expect("workspace root").join("target"));
    target.join(if cfg!(debug_assertions) { "debug" } else { "release" })
}

/// The tracer binary: `TRACER_BIN`, else the one built beside the tests.
pub fn tracer_bin() -> PathBuf {
    std::env::var_os("TRACER_BIN").map(PathBuf::from).unwrap_or_else(|| target_dir().join("tracer"))
}

pub fn lab_bin() -> PathBuf {
    std::env::var_os("LAB_BIN").map(PathBuf::from).unwrap_or_else(|| target_dir().join("lab"))
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    /// SIGTERM first, so that servers such as nginx stop their workers too; SIGKILL
    /// after two seconds.
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..40 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts `lab server ARGS` and waits until it listens.
pub fn start_lab_server(args: &[&str]) -> Result<(Proc, SocketAddr)> {
    start_lab_server_in(None, args)
}

/// The lab server's database scenario: each request looks up a row on `primary`, one in
/// four on `replica`.
pub fn start_database_backend(
    primary: &crate::pg::Cluster,
    replica: &crate::pg::Cluster,
) -> Result<(Proc, SocketAddr)> {
    start_lab_server(&[
        "--scenario",
        "database",
        "--primary",
        &primary.url(),
        "--replica",
        &replica.url(),
        "--replica-every",
        "4",
    ])
}

/// The lab binary, run inside `netns` when given.
pub fn lab_command(netns: Option<&Netns>) -> Command {
    match netns {
        Some(ns) => ns.command(lab_bin()),
        None => Command::new(lab_bin()),
    }
}

/// Starts `lab server ARGS` (inside `netns`, when given: `ip netns exec` execs the server,
/// so the child's PID is the server's) and waits until it listens.
pub fn start_lab_server_in(netns: Option<&Netns>, args: &[&str]) -> Result<(Proc, SocketAddr)> {
    let mut cmd = lab_command(netns);
    cmd.arg("server").args(args);
    start_listening(cmd)
}

/// Starts `cmd`, a lab server however wrapped, and waits until it says where it listens.
pub fn start_listening(mut cmd: Command) -> Result<(Proc, SocketAddr)> {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let proc = Proc { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected lab server output {line:?}"))?
        .parse()?;
    Ok((proc, addr))
}

pub struct Tracer {
    proc: Proc,
    stderr_lines: mpsc::Receiver<String>,
}

/// Starts the tracer with `args` (plus `--output json`) and waits until it is attached.
pub fn start_tracer(args: &[String]) -> Result<Tracer> {
    start_tracer_output(args, "json")
}

/// `tracer --output json -- COMMAND…`: the tracer runs the command and traces it from
/// its start; the command's output comes first on the tracer's stdout, then the
/// tracer's JSON lines (see [`json_lines`]).
pub fn trace_command(command: &[&str]) -> Result<(Proc, BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new(tracer_bin())
        .args(["--output", "json", "--"])
        .args(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", tracer_bin().display()))?;
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    Ok((Proc { child }, stdout))
}

/// The JSON lines left on `reader` (the tracer's output after its command's).
pub fn json_lines(reader: impl BufRead) -> Result<Vec<Value>> {
    reader.lines().map(|l| Ok(serde_json::from_str(&l?)?)).collect()
}

/// Starts the tracer with `args` plus `--output FORMAT` (`text` or `json`) and waits until
/// it is attached; for output read byte for byte with [`Tracer::stop_raw`].
pub fn start_tracer_output(args: &[String], format: &str) -> Result<Tracer> {
    let mut child = Command::new(tracer_bin())
        .args(args)
        .args(["--output", format])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tracer_bin().display()))?;
    let stderr: ChildStderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[tracer] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let tracer = Tracer { proc: Proc { child }, stderr_lines: rx };
    tracer.wait_for_line("tracer: tracing", Duration::from_secs(60)).context("the tracer did not attach")?;
    Ok(tracer)
}

impl Tracer {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits until the tracer says a line starting with `prefix` on stderr (within
    /// `timeout`); the line.
    pub fn wait_for_line(&self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("the tracer did not say {prefix:?} within {timeout:?}"),
            }
        }
    }

    /// SIGINT, then the JSON lines it printed.
    pub fn stop(mut self) -> Result<Vec<Value>> {
        // Let the last events of the traffic reach the ring buffer before stopping.
        thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for the tracer to exit by itself; its JSON lines.
    pub fn wait(&mut self) -> Result<Vec<Value>> {
        let (code, lines) = self.wait_with_code()?;
        if code != 0 {
            bail!("tracer exited with {code}; output:\n{lines:?}");
        }
        Ok(lines)
    }

    /// SIGINT, then the exit code and the JSON lines, whatever the code.
    pub fn stop_with_code(mut self) -> Result<(i32, Vec<Value>)> {
        thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
        self.wait_with_code()
    }

    /// SIGINT, then the exit code and everything it printed on its standard output, byte
    /// for byte (text output, or JSON to check before parsing).
    pub fn stop_raw(mut self) -> Result<(i32, Vec<u8>)> {
        thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
        let mut out = Vec::new();
        self.proc.child.stdout.take().expect("piped stdout").read_to_end(&mut out)?;
        let status = self.proc.child.wait()?;
        Ok((status.code().with_context(|| format!("tracer killed: {status}"))?, out))
    }

    /// Waits for the tracer to exit; its exit code and JSON lines.
    pub fn wait_with_code(&mut self) -> Result<(i32, Vec<Value>)> {
        let mut out = String::new();
        self.proc.child.stdout.take().expect("piped stdout").read_to_string(&mut out)?;
        let status = self.proc.child.wait()?;
        let code = status.code().with_context(|| format!("tracer killed: {status}"))?;
        let lines = out
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line {l:?}")))
            .collect::<Result<_>>()?;
        Ok((code, lines))
    }
}

/// The last report in the tracer's output.
pub fn final_report(lines: &[Value]) -> Result<&Value> {
    lines
        .iter()
        .rev()
        .find(|v| v["type"] == "report" && v["kind"] == "final")
        .context("no final report in the tracer's output")
}

pub fn listener<'a>(report: &'a Value, port: u16) -> Result<&'a Value> {
    report["listeners"]
        .as_array()
        .context("report without listeners")?
        .iter()
        .find(|l| l["port"] == port)
        .with_context(|| format!("no listener :{port} in {report}"))
}

/// A phase statistic in milliseconds, e.g. `phase_ms(listener, "think", "p50_ns")`.
pub fn phase_ms(listener: &Value, phase: &str, stat: &str) -> f64 {
    listener["phases"][phase][stat].as_u64().unwrap_or(u64::MAX) as f64 / 1e6
}

pub fn phase_count(listener: &Value, phase: &str) -> u64 {
    listener["phases"][phase]["count"].as_u64().unwrap_or(0)
}

/// Asserts `actual` is within max(`pct`%, `floor_ms`) of `expected`.
pub fn assert_near(what: &str, actual_ms: f64, expected_ms: f64, pct: f64, floor_ms: f64) {
    let tolerance = (expected_ms * pct / 100.0).max(floor_ms);
    assert!(
        (actual_ms - expected_ms).abs() <= tolerance,
        "{what}: {actual_ms:.3} ms is not within {tolerance:.3} ms of {expected_ms} ms"
    );
}

/// What `lab client` printed: one `key=value …` map per connection (not its `exchange`
/// lines).
pub fn run_lab_client(netns: Option<&Netns>, args: &[&str]) -> Result<Vec<std::collections::HashMap<String, f64>>> {
    let out = lab_command(netns).arg("client").args(args).stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("lab client {args:?} failed with {}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter(|line| !line.starts_with("exchange "))
        .map(|line| {
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                .collect()
        })
        .collect())
}

/// Skips a privileged test when not root, saying so.
pub fn require_root() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (run through `cargo xtask test`)");
        return false;
    }
    true
}

/// A server process started with its standard input and output kept, which prints
/// `listening on ADDR` when ready and its own times when asked (`lab hand-off`, the
/// Node.js server of the tests).
pub struct ServerProcess {
    pub proc: Proc,
    pub addr: SocketAddr,
    stdout: BufReader<std::process::ChildStdout>,
}

/// Starts `lab ARGS` (a subcommand and its options) and waits for `listening on ADDR`.
pub fn start_lab_process(args: &[&str]) -> Result<ServerProcess> {
    let mut cmd = lab_command(None);
    cmd.args(args);
    start_server_process(cmd)
}

/// Starts `cmd` and waits for `listening on ADDR` on its standard output.
pub fn start_server_process(mut cmd: Command) -> Result<ServerProcess> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let proc = Proc { child };
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let addr =
        line.trim().strip_prefix("listening on ").with_context(|| format!("unexpected output {line:?}"))?.parse()?;
    Ok(ServerProcess { proc, addr, stdout })
}

impl ServerProcess {
    /// Sends a line on its standard input and reads the `key=value …` line it answers.
    pub fn ask(&mut self) -> Result<std::collections::HashMap<String, f64>> {
        use std::io::Write as _;
        writeln!(self.proc.child.stdin.as_mut().context("stdin already closed")?)?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect())
    }
}

/// The report's entry for upstream peer `peer` (`addr:port`).
pub fn upstream_peer<'a>(report: &'a Value, peer: &str) -> Result<&'a Value> {
    report["upstreams"]
        .as_array()
        .context("report without upstreams")?
        .iter()
        .find(|u| u["peer"] == peer)
        .with_context(|| format!("no upstream {peer} in {report}"))
}

/// The sum of think of a listener (`think_attribution.think_ns`).
pub fn think_ns(l: &Value) -> u64 {
    l["think_attribution"]["think_ns"].as_u64().unwrap_or(0)
}

/// The think of a listener attributed to `peer`, or to all peers when `None`.
pub fn peer_wait_ns(l: &Value, peer: Option<&str>) -> u64 {
    l["think_attribution"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| peer.is_none_or(|peer| p["peer"] == peer))
        .map(|p| p["wait_ns"].as_u64().unwrap_or(0))
        .sum()
}

/// The share of a listener's think attributed to `peer` (all peers when `None`), in
/// percent.
pub fn attributed_pct(l: &Value, peer: Option<&str>) -> f64 {
    100.0 * peer_wait_ns(l, peer) as f64 / think_ns(l).max(1) as f64
}

/// One line per listener and upstream peer with the counts the identities relate and
/// the think attribution: printed by the real-server tests before they assert, so that
/// a failing run still shows every figure.
pub fn describe(report: &Value) -> String {
    let mut out = String::new();
    for l in report["listeners"].as_array().into_iter().flatten() {
        let peers: Vec<String> = l["think_attribution"]["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {:.1}%",
                    p["peer"],
                    100.0 * p["wait_ns"].as_f64().unwrap_or(0.0) / think_ns(l).max(1) as f64
                )
            })
            .collect();
        out += &format!(
            "listener :{} connections {} requests {} think.count {} aborted {} closed_by_peer {} | think {:.1} ms, local {:.1} ms, attributed {:.1}% [{}]\n",
            l["port"],
            l["connections"],
            l["requests"],
            phase_count(l, "think"),
            l["aborted"],
            l["closed_by_peer"],
            think_ns(l) as f64 / 1e6,
            l["think_attribution"]["local_ns"].as_f64().unwrap_or(f64::NAN) / 1e6,
            attributed_pct(l, None),
            peers.join(", "),
        );
    }
    for u in report["upstreams"].as_array().into_iter().flatten() {
        out += &format!(
            "upstream {} connections {} requests {} upstream.count {} unanswered {} unattributed {}\n",
            u["peer"],
            u["connections"],
            u["requests"],
            u["phases"]["upstream"]["count"],
            u["unanswered"],
            u["unattributed"],
        );
    }
    out
}

/// Every request is timed or counted once elsewhere: on each listener `requests` =
/// think count + `aborted`; on each upstream peer `requests` = upstream count +
/// `unanswered`. The identities that do not hold, one message each.
pub fn counts_not_adding_up(report: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    for l in report["listeners"].as_array().into_iter().flatten() {
        let (requests, aborted) = (l["requests"].as_u64(), l["aborted"].as_u64());
        let timed = phase_count(l, "think");
        if requests.is_none() || aborted.is_none() || requests != Some(timed + aborted.unwrap_or(0)) {
            wrong.push(format!(
                "listener :{}: requests {:?} != think count {timed} + aborted {:?}",
                l["port"], requests, aborted
            ));
        }
    }
    for u in report["upstreams"].as_array().into_iter().flatten() {
        let (requests, unanswered) = (u["requests"].as_u64(), u["unanswered"].as_u64());
        let timed = u["phases"]["upstream"]["count"].as_u64().unwrap_or(0);
        if requests.is_none() || unanswered.is_none() || requests != Some(timed + unanswered.unwrap_or(0)) {
            wrong.push(format!(
                "upstream {}: requests {:?} != upstream count {timed} + unanswered {:?}",
                u["peer"], requests, unanswered
            ));
        }
    }
    wrong
}

/// The share of think attributed to upstream peers never exceeds all of think, on any
/// listener: the messages of those where it does.
pub fn attribution_over_think(report: &Value) -> Vec<String> {
    report["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| peer_wait_ns(l, None) > think_ns(l))
        .map(|l| {
            format!(
                "listener :{}: peers' wait {} ns > think {} ns ({:.1}%)",
                l["port"],
                peer_wait_ns(l, None),
                think_ns(l),
                attributed_pct(l, None)
            )
        })
        .collect()
}

/// The verdicts of a test on the tracer's figures, collected so that a failing run
/// names every figure that is wrong, not only the first.
#[derive(Default)]
pub struct Verdicts {
    failed: Vec<String>,
}

impl Verdicts {
    pub fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.failed.push(message());
        }
    }

    pub fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, actual: T, expected: T) {
        self.check(actual == expected, || format!("{what}: {actual:?}, expected {expected:?}"));
    }

    /// `actual` within max(`pct`%, `floor`) of `expected`.
    pub fn near(&mut self, what: &str, actual: f64, expected: f64, pct: f64, floor: f64) {
        let tolerance = (expected.abs() * pct / 100.0).max(floor);
        self.check((actual - expected).abs() <= tolerance, || {
            format!("{what}: {actual:.3} is not within {tolerance:.3} of {expected:.3}")
        });
    }

    /// Messages of failures found elsewhere (`counts_not_adding_up`, …).
    pub fn extend(&mut self, messages: Vec<String>) {
        self.failed.extend(messages);
    }

    /// The failed verdicts' messages (for verdicts that are alternatives).
    pub fn into_failures(self) -> Vec<String> {
        self.failed
    }

    /// Panics with every failed verdict.
    pub fn finish(self) {
        assert!(self.failed.is_empty(), "{} failed:\n  {}", self.failed.len(), self.failed.join("\n  "));
    }
}

/// Listeners in the report other than the servers' own `ports`, one message each with
/// the listener's entry: the report lists the traced servers' listeners and no others.
pub fn other_listeners(report: &Value, ports: &[u16]) -> Vec<String> {
    report["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| !l["port"].as_u64().is_some_and(|p| ports.contains(&(p as u16))))
        .map(|l| format!("a listener the servers do not have: {l}"))
        .collect()
}

/// The verdicts every HTTP server traced by the real-server tests must pass: no event
/// lost, no listener but its own, `total` requests each timed, none left unanswered at a
/// close (HTTP clients close after their last response), the counts adding up, the sum
/// of think within max(5%, 2 ms) of the server's own handling time, and attribution
/// never above think.
pub fn http_server_verdicts(report: &Value, port: u16, total: u64, handling_ns: f64) -> Result<Verdicts> {
    let l = listener(report, port)?;
    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    v.extend(other_listeners(report, &[port]));
    v.eq("requests", l["requests"].as_u64(), Some(total));
    v.eq("timed requests", phase_count(l, "think"), total);
    v.eq("closed by the peer", l["closed_by_peer"].as_u64(), Some(0));
    v.extend(counts_not_adding_up(report));
    v.near("sum of think against the server's handling (ms)", think_ns(l) as f64 / 1e6, handling_ns / 1e6, 5.0, 2.0);
    v.extend(attribution_over_think(report));
    Ok(v)
}

/// The endpoint labelled `label` (`--labels`) of a listener's or an upstream peer's
/// entry in the report.
pub fn endpoint_of<'a>(entry: &'a Value, label: &str) -> Result<&'a Value> {
    entry["endpoints"].as_array().into_iter().flatten().find(|e| e["label"] == label).with_context(|| {
        let labels: Vec<&str> =
            entry["endpoints"].as_array().into_iter().flatten().filter_map(|e| e["label"].as_str()).collect();
        format!("no endpoint {label:?} among {labels:?}")
    })
}
