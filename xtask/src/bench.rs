//! `cargo xtask bench`: what tracing costs, side by side with the other ways of doing
//! the job, in one run: untraced, the tracer, a packet capture (tcpdump), a bpftrace
//! script on the same tracepoints, and an intercepting proxy (mitmproxy). Runs are
//! interleaved (every configuration once per round, several rounds) and medians are
//! reported; CPU per request comes from the kernel's BPF run-time statistics and the
//! observer's own CPU time, which are stable on a shared machine where throughput is not.
//! Each observer also serves a fixed rate (half of the untraced server's throughput in
//! the first round, held by a paced load generator, `paced`) while the whole machine's
//! busy CPU time is read from /proc/stat: machine CPU per request, everything the
//! observer causes wherever it runs, set against the untraced run of the same round.
//! Then a scale run: 100,000 open connections and 1,000,000 short ones.

mod paced;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, exec, is_root, setup, workspace_root, Killed};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Rounds: each configuration runs once per round, interleaved; medians over rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Connections held open at once in the scale run (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub scale_open: usize,
    /// Short connections in the scale run (0 skips them).
    #[arg(long, default_value_t = 1_000_000)]
    pub scale_short: u64,
    /// Only the tracer against untraced (skips the capture, bpftrace and the proxy).
    #[arg(long)]
    pub only_tracer: bool,
    /// Where to write the results (default: BENCHMARKS.md at the workspace root).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The tracer binary to measure (default: this workspace's release build), e.g. a
    /// copy of an earlier build, to compare two versions under the same conditions.
    #[arg(long)]
    pub tracer: Option<PathBuf>,
    /// A second tracer binary measured in the same rounds, interleaved with the first
    /// (e.g. the build before a change): its rows and program table are reported too.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Options the --compare build runs with besides its target (e.g. `--labels`, to
    /// set a change to labelling against the build before it, both labelling).
    #[arg(long = "compare-arg", allow_hyphen_values = true)]
    pub compare_args: Vec<String>,
    /// Only these workloads (default: all): nginx-keep-alive, nginx-close, lab-keep-alive,
    /// nginx-https-keep-alive, nginx-bystander, nginx-bystander-close.
    #[arg(long, value_delimiter = ',')]
    pub workload: Vec<Workload>,
}

impl Options {
    fn tracer_bin(&self) -> PathBuf {
        self.tracer.clone().unwrap_or_else(|| release_bin("tracer"))
    }
}

const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("wrk", "/usr/bin/wrk"),
    ("tcpdump", "/usr/bin/tcpdump"),
    ("bpftrace", "/usr/bin/bpftrace"),
    ("nginx", "/usr/sbin/nginx"),
    ("python3-venv", "/usr/share/doc/python3-venv"),
];

/// The bpftrace way of measuring think time: last read to first write per socket.
const BPFTRACE_THINK: &str = "\
tracepoint:sock:sock_recv_length /args->ret > 0/ { @last_read[args->sk] = nsecs; }
tracepoint:sock:sock_send_length /args->ret > 0 && @last_read[args->sk]/ {
  @think = hist(nsecs - @last_read[args->sk]); delete(@last_read[args->sk]);
}";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    NginxKeepAlive,
    NginxClose,
    LabKeepAlive,
    /// The same nginx and file over TLS 1.3: the tracer follows it with uprobes on
    /// OpenSSL, measured with and without them.
    NginxHttpsKeepAlive,
    /// The nginx of the keep-alive workload, untraced, while the tracer traces another
    /// (idle) nginx on the same machine: what a server it does not trace pays, its
    /// programs running for every socket all the same.
    NginxBystander,
    /// The bystander with a new connection per request: every connection's handshake,
    /// accept and close pass the tracer's state and accept hooks too.
    NginxBystanderClose,
}

impl Workload {
    const ALL: [Workload; 6] = [
        Workload::NginxKeepAlive,
        Workload::NginxClose,
        Workload::LabKeepAlive,
        Workload::NginxHttpsKeepAlive,
        Workload::NginxBystander,
        Workload::NginxBystanderClose,
    ];

    fn title(self) -> &'static str {
        match self {
            Workload::NginxKeepAlive => "nginx (1 worker), small static file, keep-alive",
            Workload::NginxClose => "nginx (1 worker), small static file, a new connection per request",
            Workload::LabKeepAlive => "lab server (thread per connection), keep-alive",
            Workload::NginxHttpsKeepAlive => {
                "nginx (1 worker), small static file over HTTPS (TLS 1.3, EC P-256), keep-alive"
            }
            Workload::NginxBystander => {
                "a bystander: nginx (1 worker), keep-alive, untraced, while the tracer traces another nginx"
            }
            Workload::NginxBystanderClose => {
                "a bystander: nginx (1 worker), a new connection per request, untraced, while the tracer traces \
                 another nginx"
            }
        }
    }

    fn closes(self) -> bool {
        matches!(self, Workload::NginxClose | Workload::NginxBystanderClose)
    }

    /// The load goes to an nginx the tracer does not trace.
    fn is_bystander(self) -> bool {
        matches!(self, Workload::NginxBystander | Workload::NginxBystanderClose)
    }

    fn is_nginx(self) -> bool {
        self != Workload::LabKeepAlive
    }

    fn is_https(self) -> bool {
        self == Workload::NginxHttpsKeepAlive
    }

    /// Whether `config` applies: the proxy in front of nginx only, the tracer without
    /// uprobes where there is TLS to hook.
    fn runs(self, config: Config) -> bool {
        if self.is_bystander() {
            return matches!(config, Config::Untraced | Config::Tracer | Config::Compared | Config::UntracedAgain);
        }
        match config {
            Config::Proxy => self.is_nginx(),
            Config::TracerNoUprobes => self.is_https(),
            Config::TracerLabels => self == Workload::NginxKeepAlive,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    Tracer,
    /// The tracer with `--skip-hook-kind uprobe`: TLS followed from its records alone,
    /// no uprobes on OpenSSL (HTTPS only): the kernel hooks' cost without them.
    TracerNoUprobes,
    /// The tracer with `--labels` (plain nginx keep-alive): what labels add.
    TracerLabels,
    /// The build given with --compare.
    Compared,
    Capture,
    Bpftrace,
    Proxy,
    /// The server untraced once more, last in each round: set against the round's first
    /// untraced run like every other configuration, it shows what the comparison itself
    /// resolves on this machine.
    UntracedAgain,
}

impl Config {
    fn is_tracer(self) -> bool {
        matches!(self, Config::Tracer | Config::TracerNoUprobes | Config::TracerLabels | Config::Compared)
    }

    fn is_untraced(self) -> bool {
        matches!(self, Config::Untraced | Config::UntracedAgain)
    }

    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Tracer => "tracer (all phases)",
            Config::TracerNoUprobes => "tracer, --skip-hook-kind uprobe",
            Config::TracerLabels => "tracer --labels",
            Config::Compared => "tracer, compared build",
            Config::Capture => "tcpdump -w (capture)",
            Config::Bpftrace => "bpftrace (think only)",
            Config::Proxy => "mitmproxy (reverse proxy)",
            Config::UntracedAgain => "untraced again (the comparison's own spread)",
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone, Default)]
struct Sample {
    rps: f64,
    requests: f64,
    /// Requests over the observer's whole life (both runs where there are two): what
    /// its events are counted against.
    requests_observed: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Observer CPU (its processes plus its BPF programs) during the load, ns.
    cpu_ns: f64,
    bpf_ns: f64,
    events: Option<f64>,
    lost: Option<f64>,
    rss_kb: Option<f64>,
    map_bytes: Option<f64>,
    /// The tracer's programs by name: run time (ns) and runs during the load.
    programs: BTreeMap<String, (f64, f64)>,
    /// The server's own CPU (user, system; ns) over the run that gave the throughput,
    /// and the requests of that run.
    server_user_ns: f64,
    server_sys_ns: f64,
    server_requests: f64,
    /// The tracer's own count of the requests it saw (its listeners' requests), against
    /// `requests_observed`.
    counted_requests: Option<f64>,
    /// How the tracer says it followed TLS, and the handshakes it saw complete.
    tls: Option<(String, f64)>,
    /// The run at a fixed rate, with the machine's busy CPU over it (plain HTTP only:
    /// the paced load generator speaks no TLS).
    fixed: Option<paced::PacedRun>,
}

impl Sample {
    /// Observer CPU per request served, µs (`measure` fails a run without requests).
    fn cpu_per_request_us(&self) -> f64 {
        self.cpu_ns / self.requests / 1e3
    }

    /// The server's CPU per request, µs: all of it and its system part.
    fn server_per_request_us(&self) -> Option<(f64, f64)> {
        (self.server_requests > 0.0).then(|| {
            let per = |ns: f64| ns / self.server_requests / 1e3;
            (per(self.server_user_ns + self.server_sys_ns), per(self.server_sys_ns))
        })
    }
}

fn bench_dir() -> PathBuf {
    workspace_root().join("target/bench")
}

fn release_bin(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen on port {port} within 30 s")
}

/// Starts `cmd` with stderr piped and waits for a stderr line containing `ready`;
/// the rest of stderr is drained in the background.
fn start_until(cmd: &mut Command, ready: &str, what: &str) -> Result<Killed> {
    let mut child = Killed(cmd.stderr(Stdio::piped()).spawn().with_context(|| format!("starting {what}"))?);
    let stderr = child.0.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(ready) => break,
            Some(Ok(_)) => {}
            _ => bail!("{what} exited before it was ready"),
        }
    }
    thread::spawn(move || lines.for_each(drop));
    Ok(child)
}

// ---------------------------------------------------------------------------------
// What a process costs: CPU of all its threads, run time of its BPF programs, memory.

fn process_cpu_ns(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

/// A process and its descendants (nginx's master and its workers).
fn with_descendants(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", pids[i])) else {
            i += 1;
            continue;
        };
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        i += 1;
    }
    pids
}

/// User and system CPU time (ns) of these processes, all threads and those that ended
/// included: `utime` and `stime` of /proc/PID/stat (clock ticks). Where a uprobe's
/// trap and return trampoline land, outside any BPF program's run time.
fn server_cpu_ns(pids: &[u32]) -> (f64, f64) {
    // SAFETY: sysconf has no side effects.
    let tick_ns = 1e9 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut cpu = (0.0, 0.0);
    for pid in pids {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the command's name (in parentheses, which may hold spaces): state is
        // field 3, utime 14 and stime 15.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        cpu.0 += ticks(11) * tick_ns;
        cpu.1 += ticks(12) * tick_ns;
    }
    cpu
}

/// Runs the load and takes the server's CPU over it.
fn load(workload: Workload, target: u16, server: &[u32], opts: &Options) -> Result<Sample> {
    let before = server_cpu_ns(server);
    let mut sample = wrk(target, workload.is_https(), workload.closes(), opts.seconds, opts.connections)?;
    let after = server_cpu_ns(server);
    sample.server_user_ns = after.0 - before.0;
    sample.server_sys_ns = after.1 - before.1;
    sample.server_requests = sample.requests;
    Ok(sample)
}

/// Sums a field over the process's BPF programs (`run_time_ns`) or maps (`memlock`).
fn fdinfo_sum(pid: u32, kind_marker: &str, field: &str) -> f64 {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return 0.0 };
    let mut total = 0.0;
    for fd in fds.flatten() {
        let Ok(info) = fs::read_to_string(fd.path()) else { continue };
        if !info.contains(kind_marker) {
            continue;
        }
        for line in info.lines() {
            if let Some(v) = line.strip_prefix(field).and_then(|v| v.trim_start_matches(':').trim().parse::<f64>().ok())
            {
                total += v;
            }
        }
    }
    total
}

/// Run time (ns) and run count of each of a process's BPF programs, by program name.
fn program_stats(pid: u32) -> BTreeMap<String, (f64, f64)> {
    let mut stats = BTreeMap::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return stats };
    for fd in fds.flatten() {
        let Ok(info) = fs::read_to_string(fd.path()) else { continue };
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name)?.trim_start_matches(':').trim().parse::<u64>().ok())
        };
        let (Some(id), Some(ns), Some(runs)) = (field("prog_id"), field("run_time_ns"), field("run_cnt")) else {
            continue;
        };
        let name = program_name(id as u32).unwrap_or_else(|| format!("id {id}"));
        let entry = stats.entry(name).or_insert((0.0, 0.0));
        entry.0 += ns as f64;
        entry.1 += runs as f64;
    }
    stats
}

/// A program's name (as the kernel keeps it: at most 15 characters), from its id.
fn program_name(id: u32) -> Option<String> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // `struct bpf_prog_info` up to and including `name` (offset 64, 16 bytes).
    let mut info = [0u8; 80];
    let mut attr = [0u64; 4];
    attr[0] = id as u64;
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, attr.as_mut_ptr(), 32) };
    if fd < 0 {
        return None;
    }
    attr = [0; 4];
    attr[0] = fd as u64 | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    let ok = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), 32) } == 0;
    unsafe { libc::close(fd as i32) };
    let name = &info[64..80];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    (ok && len > 0).then(|| String::from_utf8_lossy(&name[..len]).into_owned())
}

fn bpf_run_ns(pid: u32) -> f64 {
    fdinfo_sum(pid, "prog_type:", "run_time_ns")
}

fn map_bytes(pid: u32) -> f64 {
    fdinfo_sum(pid, "map_type:", "memlock")
}

fn status_kb(pid: u32, field: &str) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// Sets a sysctl for the duration of the benchmark.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    fn set(path: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from(path);
        let old = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(&self.path, self.old.trim());
    }
}

// ---------------------------------------------------------------------------------
// Servers and the load generator.

/// A self-signed certificate for 127.0.0.1 with an EC P-256 key: `cert.pem` and
/// `key.pem` in `dir`.
fn self_signed_cert(dir: &Path) -> Result<()> {
    exec(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-days", "30", "-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(Stdio::null()),
    )
}

/// nginx's configuration; with `tls`, HTTPS only (TLS 1.3) with a certificate made here.
fn nginx_conf(dir: &Path, port: u16, scale: bool, tls: bool) -> Result<PathBuf> {
    fs::create_dir_all(dir.join("html"))?;
    fs::write(dir.join("html/index.html"), "x".repeat(612))?;
    // At scale: several workers sharing the port (reuseport), each within the usual hard
    // file limit, which raising would need CAP_SYS_RESOURCE.
    let (workers, connections, reuseport) = if scale { (8, 16_000, " reuseport") } else { (1, 4096, "") };
    let (ssl, certificate) = if tls {
        self_signed_cert(dir)?;
        (
            " ssl",
            format!(
                "    ssl_certificate {dir}/cert.pem;\n    ssl_certificate_key {dir}/key.pem;\n    \
                 ssl_protocols TLSv1.3;\n",
                dir = dir.display()
            ),
        )
    } else {
        ("", String::new())
    };
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections {connections}; }}\n\
         http {{\n  access_log off;\n  keepalive_timeout 600s;\n  keepalive_requests 100000000;\n\
         client_body_temp_path {dir}/tmp;\n  proxy_temp_path {dir}/tmp;\n  fastcgi_temp_path {dir}/tmp;\n\
         uwsgi_temp_path {dir}/tmp;\n  scgi_temp_path {dir}/tmp;\n\
         server {{\n    listen 127.0.0.1:{port}{ssl} backlog=4096{reuseport};\n{certificate}    root {dir}/html;\n  }}\n}}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    Ok(path)
}

/// `program` with `args`, to run in a cgroup (v2) of its own, `tracer-bench/NAME` (made
/// if need be), as a service under systemd or in a container does: its sockets are that
/// cgroup's, the load generator's the bench's. (The tracer's cgroup programs go to the
/// cgroups of the traced processes and of their listeners' sockets.) Without cgroup v2,
/// where the bench runs.
fn in_own_cgroup(name: &str, program: &Path) -> Result<Command> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    let root = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    });
    let Some(root) = root else { return Ok(Command::new(program)) };
    let dir = root.join("tracer-bench").join(name);
    fs::create_dir_all(&dir).with_context(|| format!("making cgroup {}", dir.display()))?;
    // The shell moves itself in, then becomes the program (same PID).
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg("echo $$ > \"$0\" && exec \"$@\"").arg(dir.join("cgroup.procs")).arg(program);
    Ok(command)
}

fn start_nginx(name: &str, scale: bool, tls: bool) -> Result<(Killed, u16)> {
    let dir = bench_dir().join(name);
    let port = free_port()?;
    let conf = nginx_conf(&dir, port, scale, tls)?;
    let nginx = in_own_cgroup(name, Path::new("/usr/sbin/nginx"))?.arg("-c").arg(&conf).arg("-p").arg(&dir).spawn()?;
    let child = Killed(nginx);
    wait_for_port(port, "nginx")?;
    Ok((child, port))
}

fn start_lab() -> Result<(Killed, u16)> {
    let mut child = Killed(
        in_own_cgroup("lab", &release_bin("lab"))?
            .args(["server", "--scenario", "plain"])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("piped")).read_line(&mut line)?;
    let addr: SocketAddr = line.trim().strip_prefix("listening on ").context("lab server did not start")?.parse()?;
    Ok((child, addr.port()))
}

fn parse_latency_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    Some(match unit {
        "us" => value,
        "ms" => value * 1e3,
        "s" => value * 1e6,
        _ => return None,
    })
}

/// Parses wrk's summary.
fn parse_wrk(out: &str) -> Result<Sample> {
    let mut s = Sample::default();
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse()?;
        } else if line.contains(" requests in ") {
            s.requests = line.split_whitespace().next().context("request count")?.parse()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            s.p50_us = parse_latency_us(v.trim()).context("p50")?;
        } else if let Some(v) = line.strip_prefix("99%") {
            s.p99_us = parse_latency_us(v.trim()).context("p99")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            s.errors += v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            s.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if s.requests == 0.0 {
        bail!("no requests in wrk's output:\n{out}");
    }
    Ok(s)
}

fn wrk(port: u16, https: bool, close: bool, seconds: u64, connections: usize) -> Result<Sample> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let scheme = if https { "https" } else { "http" };
    cmd.arg(format!("{scheme}://127.0.0.1:{port}/index.html"));
    let out = cmd.stderr(Stdio::inherit()).output().context("running wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", out.status);
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

// ---------------------------------------------------------------------------------
// Observers.

struct Observer {
    child: Killed,
    /// Tracer only: its stdout (JSON lines), read when it stops.
    stdout: Option<std::process::ChildStdout>,
    /// Where the load goes: the server, or the proxy in front of it.
    target: u16,
}

fn mitmdump() -> PathBuf {
    bench_dir().join("venv/bin/mitmdump")
}

/// Starts `config`'s observer of the server at `server_pid` listening on `server_port`
/// (`https`: the proxy speaks TLS to it).
fn start_observer(
    config: Config,
    server_pid: u32,
    server_port: u16,
    https: bool,
    opts: &Options,
) -> Result<Option<Observer>> {
    Ok(Some(match config {
        Config::Untraced | Config::UntracedAgain => return Ok(None),
        Config::Tracer | Config::TracerNoUprobes | Config::TracerLabels | Config::Compared => {
            let bin = if config == Config::Compared {
                opts.compare.clone().context("no --compare build")?
            } else {
                opts.tracer_bin()
            };
            let mut cmd = Command::new(bin);
            cmd.args(["--pid", &server_pid.to_string(), "--output", "json"]).stdout(Stdio::piped());
            if config == Config::TracerNoUprobes {
                cmd.args(["--skip-hook-kind", "uprobe"]);
            }
            if config == Config::TracerLabels {
                cmd.arg("--labels");
            }
            if config == Config::Compared {
                cmd.args(&opts.compare_args);
            }
            let mut child = start_until(&mut cmd, "tracer: tracing", "the tracer")?;
            let stdout = child.0.stdout.take();
            Observer { child, stdout, target: server_port }
        }
        Config::Capture => {
            let file = bench_dir().join("capture.pcap");
            let mut cmd = Command::new("tcpdump");
            cmd.args(["-i", "lo", "-s", "0", "-B", "65536", "-w"]).arg(&file).args([
                "tcp",
                "port",
                &server_port.to_string(),
            ]);
            let child = start_until(&mut cmd, "listening on", "tcpdump")?;
            Observer { child, stdout: None, target: server_port }
        }
        Config::Bpftrace => {
            let mut cmd = Command::new("bpftrace");
            cmd.args(["-e", BPFTRACE_THINK]).stdout(Stdio::null());
            // bpftrace says "Attaching N probes..." on stdout in some versions: wait on
            // its programs instead.
            let child = Killed(cmd.stderr(Stdio::null()).spawn().context("starting bpftrace")?);
            let deadline = Instant::now() + Duration::from_secs(30);
            while fdinfo_sum(child.0.id(), "prog_type:", "prog_id") < 2.0 {
                if Instant::now() > deadline {
                    bail!("bpftrace did not attach within 30 s");
                }
                thread::sleep(Duration::from_millis(100));
            }
            thread::sleep(Duration::from_millis(300));
            Observer { child, stdout: None, target: server_port }
        }
        Config::Proxy => {
            let port = free_port()?;
            // Over HTTPS it terminates the client's TLS with a certificate of its own and
            // speaks TLS to the server, whose self-signed certificate it takes as it is.
            let scheme = if https { "https" } else { "http" };
            let child = Killed(
                Command::new(mitmdump())
                    .args(["--mode", &format!("reverse:{scheme}://127.0.0.1:{server_port}"), "--ssl-insecure"])
                    .args(["--listen-host", "127.0.0.1", "--listen-port", &port.to_string(), "-q"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting mitmdump")?,
            );
            wait_for_port(port, "mitmdump")?;
            Observer { child, stdout: None, target: port }
        }
    }))
}

impl Observer {
    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn cpu(&self) -> (f64, f64) {
        (process_cpu_ns(self.pid()), bpf_run_ns(self.pid()))
    }

    /// Stops it; for the tracer, its final report.
    fn stop(mut self) -> Result<Option<serde_json::Value>> {
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
        let Some(stdout) = self.stdout.take() else { return Ok(None) };
        let mut report = None;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if line.contains("\"type\":\"report\"") {
                report = Some(line);
            }
        }
        Ok(Some(serde_json::from_str(&report.context("the tracer printed no report")?)?))
    }
}

/// The run at a fixed rate, `rate` or (the round's first untraced run, before the rate
/// is known) half of `max_rps`; with the BPF statistics off, as in use, since their clock
/// reads would be in the machine's CPU. None over HTTPS.
fn fixed_rate_run(
    workload: Workload,
    target: u16,
    rate: Option<f64>,
    max_rps: f64,
    opts: &Options,
) -> Result<Option<paced::PacedRun>> {
    if workload.is_https() {
        return Ok(None);
    }
    let _off = Sysctl::set(BPF_STATS, "0")?;
    let rate = rate.unwrap_or(max_rps / 2.0);
    Ok(Some(paced::run(target, rate, opts.seconds, opts.connections, workload.closes())?))
}

/// One configuration's runs of a round: the load at full speed (twice for the observers
/// that run BPF programs), then at the fixed `rate` (None: this is the first untraced
/// run, whose throughput sets it).
/// One run of `config` with `workload` on `server`; the observer watches `observed`
/// (`server` but for a bystander).
fn measure(
    config: Config,
    workload: Workload,
    (server, observed): (&Killed, &Killed),
    port: u16,
    rate: Option<f64>,
    opts: &Options,
) -> Result<Sample> {
    let observer = start_observer(config, observed.0.id(), port, workload.is_https(), opts)?;
    let target = observer.as_ref().map_or(port, |o| o.target);
    let before = observer.as_ref().map(Observer::cpu).unwrap_or_default();
    let programs_before = match &observer {
        Some(obs) if config.is_tracer() => program_stats(obs.pid()),
        _ => BTreeMap::new(),
    };
    let server_pids = with_descendants(server.0.id());
    let mut sample = load(workload, target, &server_pids, opts)?;
    sample.requests_observed = sample.requests;
    if let Some(obs) = observer {
        let after = obs.cpu();
        sample.cpu_ns = (after.0 - before.0) + (after.1 - before.1);
        sample.bpf_ns = after.1 - before.1;
        if config.is_tracer() {
            sample.rss_kb = status_kb(obs.pid(), "VmHWM:");
            sample.map_bytes = Some(map_bytes(obs.pid()));
            for (name, (ns, runs)) in program_stats(obs.pid()) {
                let (ns0, runs0) = programs_before.get(&name).copied().unwrap_or_default();
                sample.programs.insert(name, (ns - ns0, runs - runs0));
            }
        }
        if config.is_tracer() || config == Config::Bpftrace {
            // Throughput and latency from a second run without the kernel's program
            // statistics, which add two clock reads to every program run that a traced
            // server does not pay in use; CPU and events from the first.
            let _off = Sysctl::set(BPF_STATS, "0")?;
            let plain = load(workload, target, &server_pids, opts)?;
            sample.rps = plain.rps;
            sample.server_user_ns = plain.server_user_ns;
            sample.server_sys_ns = plain.server_sys_ns;
            sample.server_requests = plain.server_requests;
            sample.p50_us = plain.p50_us;
            sample.p99_us = plain.p99_us;
            sample.errors += plain.errors;
            sample.requests_observed += plain.requests;
        }
        sample.fixed = fixed_rate_run(workload, target, rate, sample.rps, opts)?;
        sample.requests_observed += sample.fixed.as_ref().map_or(0.0, |f| f.answered as f64);
        if let Some(report) = obs.stop()? {
            sample.events = report["events"].as_f64();
            sample.lost = report["lost_events"].as_f64();
            let listeners = report["listeners"].as_array().cloned().unwrap_or_default();
            sample.counted_requests = listeners.iter().map(|l| l["requests"].as_f64()).sum();
            sample.tls = listeners
                .iter()
                .find_map(|l| Some((l["tls"]["method"].as_str()?.to_owned(), l["tls"]["connections"].as_f64()?)));
        }
    } else {
        sample.fixed = fixed_rate_run(workload, target, rate, sample.rps, opts)?;
    }
    Ok(sample)
}

// ---------------------------------------------------------------------------------
// Statistics and the report.

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The lowest and the highest of a figure over the rounds.
fn range(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

struct Row {
    config: Config,
    throughput_ratio: f64,
    /// Lowest and highest round: the spread behind the median.
    throughput_range: (f64, f64),
    rps: f64,
    added_p50_us: f64,
    added_p99_us: f64,
    cpu_per_request_us: f64,
    cpu_range: (f64, f64),
    bpf_per_request_us: f64,
    /// The server's own CPU per request (µs), its system part, and what it pays more
    /// than untraced in the same round (median and rounds' range).
    server_us: Option<f64>,
    server_sys_us: Option<f64>,
    added_server_us: Option<(f64, (f64, f64))>,
    events_per_request: Option<f64>,
    /// The tracer's count of requests against wrk's.
    counted_per_request: Option<f64>,
    lost: Option<f64>,
    rss_mb: Option<f64>,
    map_mb: Option<f64>,
    errors: u64,
}

fn rows(samples: &BTreeMap<Config, Vec<Sample>>) -> Vec<Row> {
    let base = &samples[&Config::Untraced];
    samples
        .iter()
        .map(|(config, runs)| {
            let pairs = runs.iter().zip(base);
            let ratios: Vec<f64> = pairs.clone().map(|(s, b)| s.rps / b.rps).collect();
            let cpu: Vec<f64> = runs.iter().map(Sample::cpu_per_request_us).collect();
            let opt_median = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let v: Vec<f64> = runs.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| median(v))
            };
            let added_server: Vec<f64> = pairs
                .clone()
                .filter_map(|(s, b)| Some(s.server_per_request_us()?.0 - b.server_per_request_us()?.0))
                .collect();
            Row {
                config: *config,
                throughput_range: range(&ratios),
                throughput_ratio: median(ratios),
                rps: median(runs.iter().map(|s| s.rps).collect()),
                added_p50_us: median(pairs.clone().map(|(s, b)| s.p50_us - b.p50_us).collect()),
                added_p99_us: median(pairs.clone().map(|(s, b)| s.p99_us - b.p99_us).collect()),
                cpu_range: range(&cpu),
                cpu_per_request_us: median(cpu),
                bpf_per_request_us: median(runs.iter().map(|s| s.bpf_ns / s.requests / 1e3).collect()),
                server_us: opt_median(&|s| Some(s.server_per_request_us()?.0)),
                server_sys_us: opt_median(&|s| Some(s.server_per_request_us()?.1)),
                added_server_us: (!added_server.is_empty())
                    .then(|| (median(added_server.clone()), range(&added_server))),
                events_per_request: opt_median(&|s| Some(s.events? / s.requests_observed)),
                counted_per_request: opt_median(&|s| Some(s.counted_requests? / s.requests_observed)),
                lost: runs.iter().filter_map(|s| s.lost).reduce(f64::max),
                rss_mb: opt_median(&|s| Some(s.rss_kb? / 1024.0)),
                map_mb: opt_median(&|s| Some(s.map_bytes? / (1 << 20) as f64)),
                errors: runs.iter().map(|s| s.errors).sum(),
            }
        })
        .collect()
}

/// A row's throughput against untraced and the rounds' range: "88.2% (rounds: 81.9–95.0%)".
fn throughput_with_range(r: &Row) -> String {
    let (low, high) = r.throughput_range;
    format!("{:.1}% (rounds: {:.1}–{:.1}%)", 100.0 * r.throughput_ratio, 100.0 * low, 100.0 * high)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

fn table(out: &mut String, rows: &[Row]) {
    let _ = writeln!(
        out,
        "| configuration | throughput vs untraced (rounds' range) | req/s | added p50 | added p99 | CPU/request (BPF part); rounds' range | server CPU/request (system part) | server CPU added (rounds' range) | events/request | requests counted / wrk's | lost events | tracer RSS | BPF maps | errors |"
    );
    let _ = writeln!(out, "| --- |{}", " ---: |".repeat(13));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:+.0} µs | {:+.0} µs | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.config.name(),
            if r.config == Config::Untraced {
                "100.0%".to_owned()
            } else {
                let (low, high) = r.throughput_range;
                format!("{:.1}% ({:.0}–{:.0})", 100.0 * r.throughput_ratio, 100.0 * low, 100.0 * high)
            },
            r.rps,
            r.added_p50_us,
            r.added_p99_us,
            if r.config.is_untraced() {
                "–".to_owned()
            } else {
                let (low, high) = r.cpu_range;
                format!("{:.2} µs ({:.2}); {low:.2}–{high:.2}", r.cpu_per_request_us, r.bpf_per_request_us)
            },
            match (r.server_us, r.server_sys_us) {
                (Some(all), Some(sys)) => format!("{all:.2} µs ({sys:.2})"),
                _ => "–".to_owned(),
            },
            match r.added_server_us {
                Some((added, (low, high))) if r.config != Config::Untraced => {
                    format!("{added:+.2} µs ({low:+.2}–{high:+.2})")
                }
                _ => "–".to_owned(),
            },
            opt(r.events_per_request, 2),
            opt(r.counted_per_request, 3),
            opt(r.lost, 0),
            r.rss_mb.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} MB")),
            r.map_mb.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} MB")),
            r.errors,
        );
    }
}

// ---------------------------------------------------------------------------------
// Machine CPU per request at a fixed rate.

/// How far the control (the untraced server again against the round's first untraced
/// run: the median of the rounds' ratios of machine CPU per request) may stray from 100%
/// before a run can no longer judge the differences between observers.
const CONTROL_TOLERANCE: f64 = 0.05;

/// A fixed-rate run whose CPUs were this busy was not below saturation: other work on
/// the machine takes up the idle time, and the machine's CPU per request then measures
/// its capacity, not the cost.
const SATURATED: f64 = 0.95;

/// A workload's runs at a fixed rate, configuration by configuration, round by round.
struct FixedRate<'a> {
    rate: f64,
    samples: &'a BTreeMap<Config, Vec<Sample>>,
}

impl<'a> FixedRate<'a> {
    /// None where the workload has no fixed-rate runs (HTTPS).
    fn new(samples: &'a BTreeMap<Config, Vec<Sample>>) -> Option<Self> {
        let rate = samples.get(&Config::Untraced)?.first()?.fixed.as_ref()?.rate;
        Some(Self { rate, samples })
    }

    fn runs(&self, config: Config) -> Vec<Option<&paced::PacedRun>> {
        self.samples.get(&config).map_or_else(Vec::new, |runs| runs.iter().map(|s| s.fixed.as_ref()).collect())
    }

    /// Machine CPU per request (µs) in each round.
    fn cpu(&self, config: Config) -> Vec<Option<f64>> {
        self.runs(config).into_iter().map(|r| r?.cpu_per_request_us()).collect()
    }

    /// `f` of two configurations' machine CPU per request round by round: median and range.
    fn paired(&self, a: Config, b: Config, f: fn(f64, f64) -> f64) -> Option<(f64, (f64, f64))> {
        let v: Vec<f64> = self.cpu(a).into_iter().zip(self.cpu(b)).filter_map(|(x, y)| Some(f(x?, y?))).collect();
        (!v.is_empty()).then(|| (median(v.clone()), range(&v)))
    }

    /// What a configuration adds per request to the untraced run of the same round, µs.
    fn added(&self, config: Config) -> Option<(f64, (f64, f64))> {
        self.paired(config, Config::Untraced, |x, y| x - y)
    }

    /// The untraced server again over the round's first untraced run.
    fn control(&self) -> Option<(f64, (f64, f64))> {
        self.paired(Config::UntracedAgain, Config::Untraced, |x, y| x / y)
    }

    /// Whether the control stayed within ±5%: only then are differences judged.
    fn judges(&self) -> bool {
        self.control().is_some_and(|(m, _)| (m - 1.0).abs() <= CONTROL_TOLERANCE)
    }

    /// Rounds in which a configuration's run fell behind the rate (or has none).
    fn rounds_behind(&self, config: Config) -> usize {
        self.runs(config).iter().filter(|r| !r.is_some_and(paced::PacedRun::held)).count()
    }

    /// Rounds in which the machine's CPUs were saturated during a configuration's run.
    fn rounds_saturated(&self, config: Config) -> usize {
        self.runs(config).iter().filter(|r| r.is_some_and(|r| r.busy_share() >= SATURATED)).count()
    }

    /// What the control says, as a sentence.
    fn control_sentence(&self) -> String {
        match self.control() {
            None => "No control: the untraced server did not run again.".to_owned(),
            Some(c) if self.judges() => format!(
                "The control, the untraced server again against the round's first untraced run: {} — within ±{:.0}%.",
                pct(c),
                100.0 * CONTROL_TOLERANCE
            ),
            Some(c) => format!(
                "**This run cannot judge machine CPU per request**: the control, the untraced server again \
                 against the round's first untraced run, is {}, beyond ±{:.0}% — the machine moved more than \
                 the differences between observers.",
                pct(c),
                100.0 * CONTROL_TOLERANCE
            ),
        }
    }
}

/// A workload's machine CPU per request at the fixed rate, one row per configuration.
fn fixed_rate_table(out: &mut String, fixed: &FixedRate) {
    let _ = writeln!(out, "Machine CPU/request at {:.0} req/s (fixed rate):\n", fixed.rate);
    let _ = writeln!(
        out,
        "| configuration | machine CPU/request (rounds' range) | added vs untraced, same round (rounds' range) | req/s served | CPUs busy | errors |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |");
    for &config in fixed.samples.keys() {
        let cpu: Vec<f64> = fixed.cpu(config).into_iter().flatten().collect();
        let runs: Vec<&paced::PacedRun> = fixed.runs(config).into_iter().flatten().collect();
        if runs.is_empty() {
            continue;
        }
        let (low, high) = range(&cpu);
        let behind = fixed.rounds_behind(config);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0}{} | {:.0}% | {} |",
            config.name(),
            if cpu.is_empty() { "–".to_owned() } else { format!("{:.2} µs ({low:.2}–{high:.2})", median(cpu)) },
            match fixed.added(config) {
                Some((added, (low, high))) if config != Config::Untraced => {
                    format!("{added:+.2} µs ({low:+.2}–{high:+.2})")
                }
                _ => "–".to_owned(),
            },
            median(runs.iter().map(|r| r.served_rps()).collect()),
            if behind > 0 { format!(" (behind the rate in {behind} of {} rounds)", runs.len()) } else { String::new() },
            100.0 * median(runs.iter().map(|r| r.busy_share()).collect()),
            runs.iter().map(|r| r.errors).sum::<u64>(),
        );
    }
    let _ = writeln!(out, "\n{}\n", fixed.control_sentence());
    let saturated: usize = fixed.samples.keys().map(|&c| fixed.rounds_saturated(c)).sum();
    if saturated > 0 {
        let _ = writeln!(
            out,
            "**In {saturated} runs the CPUs were {:.0}% busy or more**: not below saturation (other work on \
             the machine takes up the idle time); there machine CPU per request measures the machine's \
             capacity, not the cost, and the Targets claim no verdict from them.\n",
            100.0 * SATURATED
        );
    }
}

/// The target: the tracer's machine CPU per request at the fixed rate no more than
/// bpftrace's (think time alone) in the same rounds — judged only when the control holds.
fn true_cpu_target(out: &mut String, label: &str, fixed: &FixedRate, against: Config) {
    let (name, whose) = match against {
        Config::Capture => ("tcpdump", "tcpdump -w's"),
        _ => ("bpftrace", "bpftrace think-only's"),
    };
    let describe = |config: Config| {
        let cpu = median(fixed.cpu(config).into_iter().flatten().collect());
        fixed
            .added(config)
            .map_or_else(|| format!("{cpu:.2} µs"), |(added, _)| format!("{cpu:.2} µs ({added:+.2} µs over untraced)"))
    };
    let mut line = format!(
        "- True CPU per request (fixed rate) ≤ {whose} in the same rounds, {label} at {:.0} req/s: tracer {}",
        fixed.rate,
        describe(Config::Tracer)
    );
    let difference = fixed.paired(Config::Tracer, against, |x, y| x - y);
    let verdict = match difference {
        None => {
            let _ = write!(line, "; {name} was not measured in this run (--only-tracer)");
            "no verdict".to_owned()
        }
        Some(d) => {
            let _ = write!(line, ", {name} {}; tracer − {name} {}", describe(against), us(d));
            let behind = fixed.rounds_behind(Config::Tracer) + fixed.rounds_behind(against);
            let saturated: usize = [Config::Untraced, Config::Tracer, against, Config::UntracedAgain]
                .iter()
                .map(|&c| fixed.rounds_saturated(c))
                .sum();
            if !fixed.judges() {
                format!(
                    "no verdict: the control is {}, beyond ±{:.0}%",
                    fixed.control().map_or_else(|| "missing".to_owned(), pct),
                    100.0 * CONTROL_TOLERANCE
                )
            } else if behind > 0 {
                format!("no verdict: {behind} runs fell behind the rate")
            } else if saturated > 0 {
                format!("no verdict: in {saturated} runs the CPUs were {:.0}% busy or more", 100.0 * SATURATED)
            } else if d.0 <= 0.0 {
                "**met**".to_owned()
            } else {
                "**not met**".to_owned()
            }
        }
    };
    let _ = writeln!(out, "{line} — {verdict}");
}

/// The tracer's cost per program: which hook the CPU per request goes to.
fn program_table(out: &mut String, runs: &[Sample]) {
    let names: std::collections::BTreeSet<&String> = runs.iter().flat_map(|s| s.programs.keys()).collect();
    let mut lines = Vec::new();
    for name in names {
        let per = |f: &dyn Fn(f64, f64, f64) -> f64| {
            median(runs.iter().filter_map(|s| s.programs.get(name).map(|&(ns, n)| f(ns, n, s.requests))).collect())
        };
        let runs_per_request = per(&|_, n, requests| n / requests);
        if runs_per_request < 0.005 {
            continue;
        }
        let ns_per_run = per(&|ns, n, _| if n > 0.0 { ns / n } else { 0.0 });
        let ns_per_request = per(&|ns, _, requests| ns / requests);
        lines.push((
            ns_per_request,
            format!("| {name} | {runs_per_request:.2} | {ns_per_run:.0} | {ns_per_request:.0} |"),
        ));
    }
    if lines.is_empty() {
        return;
    }
    lines.sort_by(|a, b| b.0.total_cmp(&a.0));
    let _ = writeln!(out, "The tracer's programs (medians; names as the kernel keeps them, at most 15 characters):\n");
    let _ = writeln!(out, "| program | runs/request | ns/run | ns/request |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
    for (_, line) in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
}

/// Runs and run time (ns) per request of the tracer's uprobe programs (`ssl_*`: entries
/// of OpenSSL's calls and their returns), over one run.
fn uprobe_programs(s: &Sample) -> (f64, f64) {
    s.programs
        .iter()
        .filter(|(name, _)| name.starts_with("ssl_"))
        .fold((0.0, 0.0), |(runs, ns), (_, &(t, n))| (runs + n / s.requests, ns + t / s.requests))
}

/// A figure of two configurations' runs round by round (`f` of each pair): its median
/// and range.
fn paired(a: &[Sample], b: &[Sample], f: &dyn Fn(&Sample, &Sample) -> Option<f64>) -> (f64, (f64, f64)) {
    let v: Vec<f64> = a.iter().zip(b).filter_map(|(x, y)| f(x, y)).collect();
    (median(v.clone()), range(&v))
}

/// A paired ratio as a percentage with its rounds' range.
fn pct((m, (lo, hi)): (f64, (f64, f64))) -> String {
    format!("{:.1}% (rounds: {:.1}–{:.1}%)", 100.0 * m, 100.0 * lo, 100.0 * hi)
}

/// A paired difference in µs with its rounds' range.
fn us((m, (lo, hi)): (f64, (f64, f64))) -> String {
    format!("{m:+.2} µs (rounds: {lo:+.2} to {hi:+.2})")
}

/// The median of the server's own CPU per request over `runs`.
fn server_median(runs: &[Sample]) -> f64 {
    median(runs.iter().filter_map(|s| Some(s.server_per_request_us()?.0)).collect())
}

/// What labels cost the traced server: the tracer with `--labels` against the tracer
/// without in the same rounds.
fn labels_cost(out: &mut String, samples: &BTreeMap<Config, Vec<Sample>>) {
    let (Some(base), Some(on), Some(off)) =
        (samples.get(&Config::Untraced), samples.get(&Config::TracerLabels), samples.get(&Config::Tracer))
    else {
        return;
    };
    let server = |s: &Sample| s.server_per_request_us();
    let bpf_us = |s: &Sample| s.bpf_ns / s.requests / 1e3;
    // The tracer's process: it reads the bytes and keeps each endpoint's statistics.
    let process_us = |s: &Sample| (s.cpu_ns - s.bpf_ns) / s.requests / 1e3;
    let _ = writeln!(
        out,
        "What labels cost (`--labels`, the first bytes of each request and response copied):
"
    );
    let _ = writeln!(
        out,
        "- The server's own CPU per request: {:.2} µs traced, {:.2} µs traced with labels: labels add {} \
         per request (system part {}); the programs' run time {} per request (the aim: ≤ +0.3 µs), \
         the tracer's process {} per request (its labelling and per-endpoint statistics).",
        server_median(off),
        server_median(on),
        us(paired(on, off, &|x, y| Some(server(x)?.0 - server(y)?.0))),
        us(paired(on, off, &|x, y| Some(server(x)?.1 - server(y)?.1))),
        us(paired(on, off, &|x, y| Some(bpf_us(x) - bpf_us(y)))),
        us(paired(on, off, &|x, y| Some(process_us(x) - process_us(y)))),
    );
    let _ = writeln!(
        out,
        "- Throughput with labels {} of the tracer without them in the same rounds ({} of untraced).\n",
        pct(paired(on, off, &|x, y| Some(x.rps / y.rps))),
        pct(paired(on, base, &|x, y| Some(x.rps / y.rps))),
    );
}

/// What the uprobes cost the traced server: the tracer with them against the tracer
/// without them (`--skip-hook-kind uprobe`) in the same rounds, beside untraced.
fn uprobe_cost(out: &mut String, samples: &BTreeMap<Config, Vec<Sample>>, connections: usize) {
    let (Some(base), Some(on), Some(off)) =
        (samples.get(&Config::Untraced), samples.get(&Config::Tracer), samples.get(&Config::TracerNoUprobes))
    else {
        return;
    };
    let server = |s: &Sample| s.server_per_request_us();
    let ratio = |a: &[Sample]| paired(a, base, &|x, y| Some(x.rps / y.rps));
    let added = paired(on, off, &|x, y| Some(server(x)?.0 - server(y)?.0));
    let added_sys = paired(on, off, &|x, y| Some(server(x)?.1 - server(y)?.1));
    let (runs_on, ns_on) = (
        median(on.iter().map(|s| uprobe_programs(s).0).collect()),
        median(on.iter().map(|s| uprobe_programs(s).1).collect()),
    );
    let runs_off = median(off.iter().map(|s| uprobe_programs(s).0).collect());
    let _ = writeln!(out, "What the uprobes cost:\n");
    let _ = writeln!(
        out,
        "- Throughput: with uprobes {} of the tracer without them in the same rounds; against \
         untraced {} with them, {} without.",
        pct(paired(on, off, &|x, y| Some(x.rps / y.rps))),
        pct(ratio(on)),
        pct(ratio(off)),
    );
    let _ = writeln!(
        out,
        "- The server's own CPU per request: {:.2} µs untraced, {:.2} µs traced without uprobes, \
         {:.2} µs with them: the uprobes add {} per request (system part {}).",
        server_median(base),
        server_median(off),
        server_median(on),
        us(added),
        us(added_sys),
    );
    let _ = writeln!(
        out,
        "- Of that, the uprobe programs (`ssl_*`) ran {runs_on:.2} times per request for {:.2} µs by the \
         BPF statistics (taken with them on, which add their own clock reads); the remaining \
         {:+.2} µs or so is what no program's run time shows: the trap of every probe hit and of \
         every return through the trampoline.",
        ns_on / 1e3,
        added.0 - ns_on / 1e3,
    );
    if let Some(again) = samples.get(&Config::UntracedAgain) {
        let _ = writeln!(
            out,
            "- The comparison's resolution: the untraced server against itself in the same rounds \
             {} in throughput and {} in server CPU per request.",
            pct(ratio(again)),
            us(paired(again, base, &|x, y| Some(server(x)?.0 - server(y)?.0))),
        );
    }
    let tls = |runs: &[Sample]| {
        let Some(method) = runs.iter().find_map(|s| Some(s.tls.as_ref()?.0.clone())) else {
            return "no TLS reported".to_owned();
        };
        let handshakes = median(runs.iter().filter_map(|s| Some(s.tls.as_ref()?.1)).collect());
        format!(
            "{method} ({handshakes:.0} handshakes seen per run pair, of {} connections wrk opened)",
            2 * connections
        )
    };
    let _ = writeln!(out, "- TLS as the tracer reports it: with uprobes {}; without, {}.", tls(on), tls(off));
    if runs_off > 0.005 {
        let _ = writeln!(
            out,
            "- **Not without uprobes**: with `--skip-hook-kind uprobe` the uprobe programs still ran \
             {runs_off:.2} times per request — the tracer attached them anyway — so that row measures \
             uprobes whose programs ignore what they see, not the kernel hooks alone."
        );
    }
    let _ = writeln!(out);
}

// ---------------------------------------------------------------------------------
// System calls.

/// What one system call costs this process, ns: the best of several passes of a cheap
/// call (getppid), so that only the kernel's entry and exit paths are timed.
fn syscall_ns() -> f64 {
    const CALLS: u32 = 1_000_000;
    (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CALLS {
                // SAFETY: a system call without arguments or side effects.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            start.elapsed().as_nanos() as f64 / CALLS as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// What a process that is no server pays per read of a byte from /dev/zero (a
/// syscall-heavy loop): the best of several passes of 200,000.
fn zero_read_ns() -> Result<f64> {
    use std::io::Read as _;
    const READS: u32 = 200_000;
    let mut zero = fs::File::open("/dev/zero")?;
    let mut byte = [0u8; 1];
    Ok((0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..READS {
                let _ = zero.read(&mut byte);
            }
            start.elapsed().as_nanos() as f64 / READS as f64
        })
        .fold(f64::INFINITY, f64::min))
}

/// A system call's cost with and without the tracer attached (to the server at `pid`):
/// what every process on the machine pays while it runs, outside its programs' time;
/// and what a bystander's read loop pays with `tracer --all` attached.
struct SyscallCost {
    untraced_ns: f64,
    traced_ns: f64,
    read_untraced_ns: f64,
    read_all_ns: f64,
    /// What `tracer doctor` says of other processes' system calls (its `system calls:`
    /// line): whether the tracer attaches a syscall tracepoint here.
    doctor: String,
}

fn syscall_cost(pid: u32, port: u16, opts: &Options) -> Result<SyscallCost> {
    // As in use: the BPF statistics stay off while a traced server runs.
    let _off = Sysctl::set(BPF_STATS, "0")?;
    // Five times each, alternating; the least of each (interference only adds).
    let doctor = Command::new(opts.tracer_bin()).arg("doctor").output().context("running tracer doctor")?;
    let doctor = String::from_utf8_lossy(&doctor.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("system calls: "))
        .unwrap_or("(the doctor printed no system calls line)")
        .to_owned();
    let mut cost = SyscallCost {
        untraced_ns: syscall_ns(),
        traced_ns: f64::INFINITY,
        read_untraced_ns: zero_read_ns()?,
        read_all_ns: f64::INFINITY,
        doctor,
    };
    for _ in 0..5 {
        let observer = start_observer(Config::Tracer, pid, port, false, opts)?.context("no tracer started")?;
        cost.traced_ns = cost.traced_ns.min(syscall_ns());
        observer.stop()?;
        cost.untraced_ns = cost.untraced_ns.min(syscall_ns());
        let mut all = Command::new(opts.tracer_bin());
        all.args(["--all", "--output", "json"]).stdout(Stdio::null());
        let all = start_until(&mut all, "tracer: tracing", "tracer --all")?;
        cost.read_all_ns = cost.read_all_ns.min(zero_read_ns()?);
        drop(all);
        cost.read_untraced_ns = cost.read_untraced_ns.min(zero_read_ns()?);
    }
    Ok(cost)
}

// ---------------------------------------------------------------------------------
// Scale.

#[derive(Default)]
struct Scale {
    open: usize,
    /// Connections established on the server's side when the tracer's count was taken.
    open_live: usize,
    open_tracked: Option<u64>,
    open_rss_mb: Option<f64>,
    open_map_mb: Option<f64>,
    after_close_tracked: Option<u64>,
    after_close_live: usize,
    short: u64,
    short_seconds: f64,
    rss_samples_mb: Vec<(u64, f64)>,
    short_tracked: Option<u64>,
    short_live: usize,
    short_lost: Option<f64>,
    short_untracked: Option<f64>,
}

/// The tracer with interval reports collected in the background.
struct ScaleTracer {
    child: Killed,
    reports: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl ScaleTracer {
    fn start(tracer: &Path, pid: u32, max_sockets: usize) -> Result<Self> {
        let mut cmd = Command::new(tracer);
        cmd.args(["--pid", &pid.to_string(), "--output", "json", "--interval", "1s"])
            .args(["--max-sockets", &max_sockets.to_string()])
            .stdout(Stdio::piped());
        let mut child = start_until(&mut cmd, "tracer: tracing", "the tracer")?;
        let stdout = child.0.stdout.take().expect("piped");
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&reports);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["type"] == "report" {
                        sink.lock().expect("reports").push(v);
                    }
                }
            }
        });
        Ok(Self { child, reports })
    }

    /// The first report that arrives after now.
    fn next_report(&self) -> Result<serde_json::Value> {
        let seen = self.reports.lock().expect("reports").len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(r) = self.reports.lock().expect("reports").get(seen) {
                return Ok(r.clone());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("no report from the tracer within 60 s")
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// Established TCP connections on `port` (either side), from /proc/net/tcp.
fn live_connections(port: u16) -> usize {
    let hex = format!(":{port:04X}");
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&hex) && f[3] == "01"
        })
        .count()
}

fn scale(opts: &Options) -> Result<Scale> {
    let mut out = Scale::default();
    let (nginx, port) = start_nginx("nginx-scale", true, false)?;
    let tracer = ScaleTracer::start(&opts.tracer_bin(), nginx.0.id(), (opts.scale_open + 50_000).next_power_of_two())?;
    if opts.scale_open > 0 {
        eprintln!("bench: opening {} connections", opts.scale_open);
        // Holders of at most 16,000 connections each, to stay within the file limit.
        let holders = opts.scale_open.div_ceil(16_000);
        let mut held = Vec::new();
        for h in 0..holders {
            let n = opts.scale_open / holders + usize::from(h < opts.scale_open % holders);
            let mut hold = Killed(
                Command::new(release_bin("lab"))
                    .args(["hold", "--server", &format!("127.0.0.1:{port}"), "--connections", &n.to_string()])
                    .args(["--sources", "2", "--source-offset", &(2 * h).to_string()])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?,
            );
            let lines = BufReader::new(hold.0.stdout.take().expect("piped")).lines();
            held.push((hold, lines));
        }
        for (_, lines) in &mut held {
            let line = lines.next().context("lab hold exited")??;
            out.open += line.strip_prefix("open ").context("lab hold output")?.parse::<usize>()?;
        }
        // A client counts a connection open when connect() returns; the server may not
        // have it yet (a full accept queue drops the final ACK until the client sends
        // again): wait for the server's side, then take the tracer's next report.
        let deadline = Instant::now() + Duration::from_secs(30);
        while live_connections(port) < out.open && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(250));
        }
        out.open_live = live_connections(port);
        let report = tracer.next_report()?;
        out.open_tracked = report["tracked_sockets"].as_u64();
        out.open_rss_mb = status_kb(tracer.pid(), "VmRSS:").map(|kb| kb / 1024.0);
        out.open_map_mb = Some(map_bytes(tracer.pid()) / (1 << 20) as f64);
        for (hold, lines) in &mut held {
            writeln!(hold.0.stdin.take().expect("piped"))?;
            lines.next();
        }
        drop(held);
        thread::sleep(Duration::from_millis(1500));
        let report = tracer.next_report()?;
        out.after_close_tracked = report["tracked_sockets"].as_u64();
        out.after_close_live = live_connections(port);
    }
    if opts.scale_short > 0 {
        eprintln!("bench: {} short connections", opts.scale_short);
        let start = Instant::now();
        while out.short < opts.scale_short {
            let s = wrk(port, false, true, 5, 32)?;
            out.short += s.requests as u64;
            if let Some(kb) = status_kb(tracer.pid(), "VmRSS:") {
                out.rss_samples_mb.push((out.short, kb / 1024.0));
            }
        }
        out.short_seconds = start.elapsed().as_secs_f64();
        thread::sleep(Duration::from_millis(1500));
        let report = tracer.next_report()?;
        out.short_tracked = report["tracked_sockets"].as_u64();
        out.short_live = live_connections(port);
        out.short_lost = report["lost_events"].as_f64();
        out.short_untracked = report["untracked_connections"].as_f64();
    }
    drop(tracer);
    drop(nginx);
    Ok(out)
}

// ---------------------------------------------------------------------------------

fn ensure_mitmproxy() -> Result<()> {
    if mitmdump().exists() {
        return Ok(());
    }
    let venv = bench_dir().join("venv");
    eprintln!("bench: installing mitmproxy into {}", venv.display());
    exec(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    exec(Command::new(venv.join("bin/pip")).args(["install", "-q", "mitmproxy"]))
}

fn machine() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(|s| s.trim().to_owned()))
        .unwrap_or_default();
    format!("Linux {}, {cpus} CPUs ({model})", kernel.trim())
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    if !is_root() {
        bail!("the benchmark loads eBPF programs and captures packets: run `cargo xtask bench` as root");
    }
    setup::debian_packages(BENCH_PACKAGES)?;
    // Each workload runs those that apply to it (`Workload::runs`).
    let mut configs = vec![Config::Untraced, Config::Tracer, Config::TracerNoUprobes, Config::TracerLabels];
    if opts.compare.is_some() {
        configs.push(Config::Compared);
    }
    if !opts.only_tracer {
        ensure_mitmproxy()?;
        configs.extend([Config::Capture, Config::Bpftrace, Config::Proxy]);
    }
    configs.push(Config::UntracedAgain);
    let workloads = if opts.workload.is_empty() { Workload::ALL.to_vec() } else { opts.workload.clone() };
    exec(cargo().args(["build", "--release", "--package", "tracer", "--package", "tracer-tests", "--bins"]))?;
    fs::create_dir_all(bench_dir())?;
    let _stats = Sysctl::set(BPF_STATS, "1")?;

    let (nginx, nginx_port) = start_nginx("nginx", false, false)?;
    let (lab, lab_port) = start_lab()?;
    let https = match workloads.iter().any(|w| w.is_https()) {
        true => Some(start_nginx("nginx-https", false, true)?),
        false => None,
    };
    // The nginx the tracer traces while the load goes to the other: idle.
    let traced_idle = match workloads.iter().any(|w| w.is_bystander()) {
        true => Some(start_nginx("nginx-idle", false, false)?.0),
        false => None,
    };
    let mut results: BTreeMap<Workload, BTreeMap<Config, Vec<Sample>>> = BTreeMap::new();
    // Each workload's fixed rate: half of the first untraced run's throughput.
    let mut rates: BTreeMap<Workload, f64> = BTreeMap::new();
    for round in 1..=opts.rounds {
        for &workload in &workloads {
            let (server, port) = match (workload, &https) {
                (Workload::NginxHttpsKeepAlive, Some((server, port))) => (server, *port),
                (Workload::LabKeepAlive, _) => (&lab, lab_port),
                _ => (&nginx, nginx_port),
            };
            let observed = match &traced_idle {
                Some(idle) if workload.is_bystander() => idle,
                _ => server,
            };
            for &config in &configs {
                if !workload.runs(config) {
                    continue;
                }
                eprintln!("bench: round {round}/{}: {:?} / {}", opts.rounds, workload, config.name());
                let sample = measure(config, workload, (server, observed), port, rates.get(&workload).copied(), opts)
                    .with_context(|| format!("{:?} with {}", workload, config.name()))?;
                // Every run's figures in the log: the spread behind the medians.
                let fixed = sample.fixed.as_ref().map_or(String::new(), |f| {
                    rates.entry(workload).or_insert(f.rate);
                    format!(
                        "; at {:.0} req/s: {:.0} served, machine CPU {} µs/request",
                        f.rate,
                        f.served_rps(),
                        opt(f.cpu_per_request_us(), 2)
                    )
                });
                eprintln!(
                    "bench:   {:.0} req/s, p99 {:.0} µs, CPU {:.2} µs/request{fixed}",
                    sample.rps,
                    sample.p99_us,
                    sample.cpu_per_request_us()
                );
                results.entry(workload).or_default().entry(config).or_default().push(sample);
            }
        }
    }
    eprintln!("bench: the cost of a system call, untraced and traced");
    let syscalls = syscall_cost(nginx.0.id(), nginx_port, opts)?;
    drop(https);
    drop(traced_idle);
    drop(lab);
    drop(nginx);
    let path = opts.out.clone().unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    // The long run's section (`cargo xtask soak`) is kept as it is.
    let soak = fs::read_to_string(&path).ok().and_then(|old| crate::soak::section_of(&old).map(str::to_owned));
    let keep_soak = |text: String| match &soak {
        Some(section) => crate::soak::with_section(&text, section),
        None => text,
    };
    // Written now, and again with the scale run: a failing scale run loses nothing.
    fs::write(&path, keep_soak(render(opts, &results, &syscalls, None)))?;
    let scale = if opts.scale_open > 0 || opts.scale_short > 0 {
        Some(scale(opts).map_err(|e| format!("{e:#}")))
    } else {
        None
    };
    let text = keep_soak(render(opts, &results, &syscalls, scale.as_ref()));
    fs::write(&path, &text)?;
    println!("{text}");
    eprintln!("bench: written to {}", path.display());
    match scale {
        Some(Err(e)) => bail!("the scale run failed: {e}"),
        _ => Ok(()),
    }
}

fn render(
    opts: &Options,
    results: &BTreeMap<Workload, BTreeMap<Config, Vec<Sample>>>,
    syscalls: &SyscallCost,
    scale: Option<&Result<Scale, String>>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `cargo xtask bench` on {}. Each configuration ran {} times per workload, \
         interleaved (every configuration once per round), {} s of `wrk -t1 -c{}` each; the \
         figures are medians over the rounds (throughput and added latency as medians of \
         the per-round comparison with the untraced run of the same round), and the lowest \
         and highest round of throughput and CPU follow them: on a shared machine the \
         spread is part of the result. The last run of every round is the untraced server \
         again, compared with the round's first like every observer: its row is what the \
         comparison itself resolves here (ideally 100%, with a narrow range).\n",
        machine(),
        opts.rounds,
        opts.seconds,
        opts.connections
    );
    let _ = writeln!(
        out,
        "CPU/request is the observer's cost per request served: the run time of its BPF \
         programs (`kernel.bpf_stats_enabled`) plus the CPU time of its own processes, over \
         the load. For the packet capture this misses the kernel's copying of every packet \
         to the capture socket, which runs in the context of the traffic and is not \
         attributable: its figure is a lower bound. Events/request, lost events, RSS (peak) \
         and BPF map memory are the tracer's own. The observers that run BPF programs (the \
         tracer, bpftrace) load the server twice per round with the observer attached: \
         once with `kernel.bpf_stats_enabled` on, for CPU/request and events, and once \
         with it off, for throughput and latency, because the statistics add two clock \
         reads to every program run, which a traced server does not pay in use.\n"
    );
    let _ = writeln!(
        out,
        "Server CPU/request is what the server itself burns per request: the user and system \
         time of its processes (`utime` + `stime` of /proc/PID/stat, nginx's master and \
         worker) over the run that gave the throughput, divided by that run's requests, \
         its system part in parentheses; added is the median of its per-round difference \
         from the untraced run of the same round. It holds what a probe costs the traced \
         process outside any program's run time (a uprobe's trap and its return \
         trampoline), and also the tracer's programs that run in the server's own context \
         (its sends and receives), so it overlaps CPU/request. Requests counted / wrk's is \
         the tracer's count of requests (its report's listeners) over the requests wrk \
         completed while it was attached.\n"
    );
    let _ = writeln!(
        out,
        "Machine CPU/request (fixed rate) is the true cost, everything an observer causes \
         wherever it runs: after the loads above, with the observer still attached and the \
         BPF statistics off, a paced load generator (threads of one request in flight each, \
         {} of them, on a fixed schedule; over plain HTTP only) holds half of the untraced \
         server's throughput in the first round, the same rate for every configuration in \
         every round, below saturation; the busy time of all CPUs (/proc/stat's `cpu` line: \
         user, nice, system, irq, softirq and steal) over the run is divided by the requests \
         answered; CPUs busy is that time's share of all CPUs' time: from {:.0}% on, the run \
         was not below saturation (other work on the machine takes up the idle time) and \
         says nothing of the cost. It holds the server, the load generator, the kernel on both sides, the \
         observer's programs and process, and whatever else runs on the machine, alike in \
         every run; added is the median of its per-round difference from the untraced run \
         of the same round: what the observer adds per request. The control is the untraced \
         server again over the round's first untraced run: beyond ±{:.0}% in median, the run \
         says that it cannot judge, and the Targets claim no verdict from it.\n",
        opts.connections,
        100.0 * SATURATED,
        100.0 * CONTROL_TOLERANCE
    );
    // Each workload's rows, for the targets after the tables.
    let mut tables = Vec::new();
    for (workload, samples) in results {
        let _ = writeln!(out, "## {}\n", workload.title());
        let rows = rows(samples);
        table(&mut out, &rows);
        let _ = writeln!(out);
        let fixed = FixedRate::new(samples);
        if let Some(fixed) = &fixed {
            fixed_rate_table(&mut out, fixed);
        }
        let tracers = [Config::Tracer, Config::TracerNoUprobes, Config::TracerLabels, Config::Compared];
        let several = tracers.iter().filter(|c| samples.contains_key(c)).count() > 1;
        for config in tracers {
            if let Some(runs) = samples.get(&config) {
                if several {
                    let _ = writeln!(out, "{}:\n", config.name());
                }
                program_table(&mut out, runs);
            }
        }
        uprobe_cost(&mut out, samples, opts.connections);
        labels_cost(&mut out, samples);
        tables.push((*workload, rows, fixed, samples));
    }
    let _ = writeln!(
        out,
        "## Outside the tracer's programs\n\n\
         A system call (getppid; the fastest of 35 or more passes of a million, taken five \
         times in turn with and without the tracer) took {:.1} ns untraced and {:.1} ns with \
         it attached: {:+.1} ns on every system call of every process on the machine while \
         it runs. Where accept is hooked on the syscall tracepoints, this is their doing: while \
         any syscall tracepoint is enabled, the kernel sends every system call's exit through \
         its tracing path. Where no kprobe or BPF trampoline hooks accept (this machine), it is \
         hooked on the peer's address instead, in the traced processes' cgroups (nginx asks \
         accept() for it), and the syscall tracepoints are added only from the first accept \
         of a traced process that asks for none. It is not in CPU/request above (neither the \
         tracer's programs nor its process); \
         a request on nginx keep-alive makes a few system calls on each side.\n\n\
         A process that is no server (a loop of one-byte reads from /dev/zero, the fastest \
         of 35 passes of 200,000, in turn with and without `tracer --all`, which traces \
         every server of the machine) read in {:.1} ns untraced and {:.1} ns with `--all` \
         attached: {:+.1} ns per read.\n",
        syscalls.untraced_ns,
        syscalls.traced_ns,
        syscalls.traced_ns - syscalls.untraced_ns,
        syscalls.read_untraced_ns,
        syscalls.read_all_ns,
        syscalls.read_all_ns - syscalls.read_untraced_ns,
    );
    let _ = writeln!(out, "## Targets\n");
    let verdict = |ok: bool| if ok { "**met**" } else { "**not met**" };
    for (workload, rows, fixed, samples) in &tables {
        let find = |config: Config| rows.iter().find(|r| r.config == config);
        let Some(t) = find(Config::Tracer) else { continue };
        // A throughput verdict needs a control (the untraced server against itself)
        // within ±5%.
        let control = find(Config::UntracedAgain);
        let throughput = |at_least: f64, what: &str| {
            let judged = match control {
                None => "no verdict: no control run".to_owned(),
                Some(c) if (c.throughput_ratio - 1.0).abs() > CONTROL_TOLERANCE => format!(
                    "no verdict: the untraced server against itself was {}, beyond ±{:.0}%",
                    throughput_with_range(c),
                    100.0 * CONTROL_TOLERANCE
                ),
                Some(c) => format!(
                    "{} (the untraced server against itself: {})",
                    verdict(t.throughput_ratio >= at_least),
                    throughput_with_range(c)
                ),
            };
            format!(
                "- Throughput ≥ {:.0}% of untraced, {what}: {} — {judged}",
                100.0 * at_least,
                throughput_with_range(t)
            )
        };
        match workload {
            Workload::NginxKeepAlive => {
                let _ = writeln!(out, "{}", throughput(0.95, "nginx keep-alive"));
                if let Some(fixed) = fixed {
                    true_cpu_target(&mut out, "nginx keep-alive", fixed, Config::Bpftrace);
                }
                match find(Config::Bpftrace) {
                    Some(b) => {
                        let _ = writeln!(
                            out,
                            "- The programs' CPU per request ≤ 0.8 × bpftrace think-only's, nginx keep-alive: \
                             {:.2} µs against {:.2} µs ({:.2}×) — {}",
                            t.bpf_per_request_us,
                            b.bpf_per_request_us,
                            t.bpf_per_request_us / b.bpf_per_request_us,
                            verdict(t.bpf_per_request_us <= 0.8 * b.bpf_per_request_us)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "- The programs' CPU per request ≤ 0.8 × bpftrace think-only's: {:.2} µs; bpftrace not \
                             measured in this run (--only-tracer) — no verdict",
                            t.bpf_per_request_us
                        );
                    }
                }
                if let (Some(on), Some(off)) = (samples.get(&Config::TracerLabels), samples.get(&Config::Tracer)) {
                    let bpf_us = |s: &Sample| s.bpf_ns / s.requests / 1e3;
                    let cpu_us = |s: &Sample| s.cpu_ns / s.requests / 1e3;
                    let added = paired(on, off, &|x, y| Some(cpu_us(x) - cpu_us(y)));
                    let added_bpf = paired(on, off, &|x, y| Some(bpf_us(x) - bpf_us(y)));
                    let _ = writeln!(
                        out,
                        "- Labels on ≤ +0.3 µs per request over labels off (the tracer's CPU: its programs and \
                         its process): {} ({} of it the programs') — {}",
                        us(added),
                        us(added_bpf),
                        verdict(added.0 <= 0.3)
                    );
                }
            }
            Workload::NginxClose => {
                let _ = writeln!(out, "{}", throughput(0.95, "a new connection per request"));
                let capture = find(Config::Capture);
                let _ = writeln!(
                    out,
                    "- CPU per request ≤ tcpdump -w's in the same rounds and ≤ 2.5 µs, a new connection per \
                     request: {:.2} µs (rounds: {:.2}–{:.2}){} — {}",
                    t.cpu_per_request_us,
                    t.cpu_range.0,
                    t.cpu_range.1,
                    capture.map_or_else(
                        || "; tcpdump not measured in this run (--only-tracer)".to_owned(),
                        |c| format!(", tcpdump -w {:.2} µs (a lower bound, see above)", c.cpu_per_request_us)
                    ),
                    match capture {
                        Some(c) => verdict(t.cpu_per_request_us <= c.cpu_per_request_us && t.cpu_per_request_us <= 2.5)
                            .to_owned(),
                        None =>
                            format!("{} for ≤ 2.5 µs; no verdict against tcpdump", verdict(t.cpu_per_request_us <= 2.5)),
                    }
                );
                // The capture's own figure misses the packet copies it causes: set against
                // it, what each costs the whole machine at a fixed rate.
                if let Some(fixed) = fixed {
                    true_cpu_target(&mut out, "a new connection per request", fixed, Config::Capture);
                }
            }
            Workload::LabKeepAlive => {
                if let Some(fixed) = fixed {
                    true_cpu_target(&mut out, "lab keep-alive", fixed, Config::Bpftrace);
                }
            }
            Workload::NginxHttpsKeepAlive => {
                if let (Some(on), Some(off)) = (samples.get(&Config::Tracer), samples.get(&Config::TracerNoUprobes)) {
                    let server = |s: &Sample| s.server_per_request_us();
                    let _ = writeln!(
                        out,
                        "- TLS uprobes, stated per HTTPS request: the server's own CPU {} with them over without \
                         (see \"What the uprobes cost\" above)",
                        us(paired(on, off, &|x, y| Some(server(x)?.0 - server(y)?.0)))
                    );
                }
            }
            Workload::NginxBystander | Workload::NginxBystanderClose => {
                // Within its own control: no lower than the lowest round of the untraced
                // server against itself.
                let judged = match control {
                    Some(c) => format!(
                        "{} (the untraced server against itself: {})",
                        verdict(t.throughput_ratio >= c.throughput_range.0.min(1.0)),
                        throughput_with_range(c)
                    ),
                    None => "no verdict: no control run".to_owned(),
                };
                let how = if workload.closes() { "a new connection per request" } else { "keep-alive" };
                let _ = writeln!(
                    out,
                    "- A bystander server's throughput within its own control ({how}): {} — {judged}",
                    throughput_with_range(t)
                );
                let _ = writeln!(
                    out,
                    "- The programs' time on a bystander's sockets ≤ 0.2 µs per request ({how}): {:.2} µs — {}; \
                     the tracer counted {} of its requests",
                    t.bpf_per_request_us,
                    verdict(t.bpf_per_request_us <= 0.2),
                    t.counted_per_request.map_or("–".to_owned(), |c| format!("{:.0}%", 100.0 * c))
                );
            }
        }
        if let Some(lost) = t.lost {
            let _ = writeln!(out, "- Zero lost events ({:?}): {lost:.0} lost — {}", workload, verdict(lost == 0.0));
        }
    }
    let _ = writeln!(
        out,
        "- System-call tax while attached: 0 ns (no syscall tracepoint) — {}: the doctor says \"{}\"; measured \
         {:+.1} ns per system call here (with a syscall tracepoint attached, +16 to +45 ns; without, runs of \
         this bench gave +0.8 to +5.7 ns: what this measurement resolves). Where neither a kprobe nor a \
         trampoline hooks accept (this machine: BPF trampolines are not permitted, no kprobes), accept is \
         hooked on the peer's address in the traced processes' cgroups, with the syscall tracepoints added \
         only for a traced server that accepts without asking for it; `cargo xtask vm-test` checks the \
         doctor's line on Debian's 5.10, 6.1 and 6.12",
        verdict(syscalls.doctor.starts_with("untaxed")),
        syscalls.doctor,
        syscalls.traced_ns - syscalls.untraced_ns,
    );
    let _ = writeln!(out, "{READING}");
    if let Some(Err(e)) = scale {
        let _ = writeln!(out, "\n## Scale\n\nThe scale run failed: {e}");
    }
    if let Some(Ok(s)) = scale {
        let _ = writeln!(out, "\n## Scale\n");
        if s.open > 0 {
            let _ = writeln!(
                out,
                "- {} connections open at once (from several loopback source addresses, spread over \
                 holders and nginx workers within the file limit): \
                 the tracer tracked {} sockets ({} established on the server's side), its RSS was {}, \
                 its BPF maps {}. After they closed: {} sockets tracked, {} connections still established.",
                s.open,
                opt(s.open_tracked.map(|v| v as f64), 0),
                s.open_live,
                s.open_rss_mb.map_or("–".into(), |v| format!("{v:.1} MB")),
                s.open_map_mb.map_or("–".into(), |v| format!("{v:.1} MB")),
                opt(s.after_close_tracked.map(|v| v as f64), 0),
                s.after_close_live
            );
            if let Some(rss) = s.open_rss_mb {
                let _ = writeln!(
                    out,
                    "- Tracer RSS ≤ 50 MB with {} open connections: {rss:.1} MB — {}",
                    s.open,
                    if rss <= 50.0 { "**met**" } else { "**not met**" }
                );
            }
        }
        if s.short > 0 {
            let rss: Vec<String> = s.rss_samples_mb.iter().map(|(n, mb)| format!("{mb:.1} MB after {n}")).collect();
            let _ = writeln!(
                out,
                "- {} short connections (a new connection per request) in {:.0} s: afterwards {} sockets \
                 tracked with {} established; {} events lost, {} connections untracked. Tracer RSS along \
                 the way: {}.",
                s.short,
                s.short_seconds,
                opt(s.short_tracked.map(|v| v as f64), 0),
                s.short_live,
                opt(s.short_lost, 0),
                opt(s.short_untracked, 0),
                rss.join(", ")
            );
        }
    }
    out
}

/// How to read the tables: what the figures include, what limits the tracer's cost, and
/// what was changed because of them.
const READING: &str = "
## Reading

- **Where the tracer's CPU goes.** Per request on nginx keep-alive the programs run
  six times: receive and send (process context) and the segment hook (softirq: data
  arrival and acknowledgements, one program), once for nginx's socket and once for the
  load generator's — on loopback both ends of every connection are on this machine. The
  load generator's own sends and receives are recognised as untraced from a per-CPU
  memory of the last untraced process, without a lookup; its segments (softirq, no
  process to go by) cost one hash-map miss each. A server whose clients are elsewhere
  pays only the traced half. The receive hook is the dearest: it closes the previous
  exchange and emits its event. The tracer process spends about 0.1 µs per request
  (decoding, the timeline, four HDR histogram records, a listener's histograms found by
  indexing an array by phase rather than searching a map: 78 → 57 ns per exchange for
  decoding, timeline and statistics together, measured over recorded exchanges; the
  rest is reading the ring and cache misses after each pause); it drains the ring every 50 ms
  as a batch task (`SCHED_BATCH`: its wake-ups never preempt the server) and offers the
  CPU back every 512 events.
- **What changed because of this benchmark.** The first version woke the tracer for
  every event: a ring-buffer wake-up is an inter-processor interrupt, a VM exit on this
  machine, and the receive hook cost 3.4 µs per call. Events are now submitted without a
  wake-up and drained on a timer (a ring a quarter full still wakes the tracer at once).
  Data arrival used to have a hook of its own (`sk_data_ready`): it is taken from the
  segment hook, which sees every incoming segment anyway (two runs fewer per request).
  Then, each measured against the build before it in the same rounds (`--compare`):
  the connection's state is laid out by cache line — a hash-map entry is exactly four
  64-byte lines, the line with the key is never written after the insert, and the
  fields the softirq writes share one line — so a lookup from the other CPU no longer
  waits for the line the application just wrote (1.15 → 1.09 µs), and the load
  generator's sends and receives skip the lookup (both together: 1.03 → 0.99 µs in
  another run); the per-request event fits one
  cache line with the ring's record header (56 bytes: times as offsets from the
  earliest, the full form kept for exchanges over 4.29 s), and every record is rounded
  to whole lines so that records start on line boundaries (receive hook 194 → 156 ns per
  run, 1.15 → 0.98 µs per request). New connections' state used to be cleared by the BPF
  library's byte-at-a-time memset (200 stores per connection); it is cleared a word at
  a time, and every program's stack frame is now at most 256 bytes. The tracer's
  resident memory after start-up was halved by returning the memory used to parse the
  kernel's BTF. Each drain (some 5,000 events, over half a millisecond) used to preempt
  nginx, which held its requests until the drain was done: as a batch task that pauses
  every 512 events, added p99 latency went from +243 µs to +63 µs in the same rounds.
  The tracer's own work per exchange held a hash-set insertion and removal among the
  last 65,536 requests (to tell an upstream wait that comes after its request was
  answered); the connection now keeps its last answered request instead, one
  comparison: the tracer process's CPU per keep-alive request 1.07 → 0.53 µs in a
  3-round run against the build before (at a slow hour, all figures about twice those
  above). The BTF-typed tracepoints load the kernel fields they need in place, each load
  checked by the verifier against the kernel's types, instead of calling the
  probe-read helper: the segment hook's sequence numbers, the send hook's write and
  acknowledged sequence numbers, a new connection's port, retransmits and round trip
  (raw tracepoints, whose arguments are untyped, keep the helper). Against the build
  before, in the same 3 rounds and slow hour: the segment hook 296 → 239 ns per run and
  the send hook 360 → 328 ns on keep-alive (the programs 3.09 → 2.94 µs per request),
  the state hook 391 → 347 ns per run on a new connection per request (the programs
  11.96 → 10.99 µs per connection). A process that links OpenSSL had every socket call
  look for the thread's call into the library, also where it serves plain HTTP (three
  lookups per request); a count of calls under way now spares the lookup while it is 0:
  the write-start hook 313 → 289 ns and the send hook 290 → 269 ns per run, the receive
  hook 386 → 395 ns, in 3 rounds — a few percent, within what such a run resolves.
  The segment hook runs for every segment the machine receives, the load generator's
  half included, and looked each one's socket up in the hash map; it now first tests
  the socket's local port (one typed load) against a byte per port, marked as a traced
  process accepts, connects or adopts a connection, and looks up only marked ones:
  against the build before in the same 3 rounds (slow hour), the segment hook 195 →
  150 ns per run, the programs 2.04 → 1.84 µs per keep-alive request; on a new
  connection per request (slower hour still) 182 → 154 ns per run, the programs 8.42 →
  8.37 µs per connection, where the record-layer program's ten runs (0.92 µs) and the
  state hook's ten (2.4–2.6 µs) weigh more.
- **Absolute figures move with the machine.** These two cores are shared: within one
  working session the untraced server ran between 88,000 and 124,000 requests per
  second, and one and the same tracer build measured between 0.98 and 1.32 µs per
  request. The comparison
  inside one run is what holds: the tracer against bpftrace computing think time alone,
  and a change against the build before it.
- **A new connection per request** costs about 5 µs: the connection's state changes
  run the state hook about ten times (both ends, ~0.2 µs each), the accept hook walks
  the file table from a syscall tracepoint (~0.9 µs; a classic tracepoint fills a
  record before the program runs), and two records are emitted and processed: the
  open, then the last exchange and the close together. On kernels that permit
  trampolines, fexit on `inet_csk_accept` hands over the socket directly
  (`--skip-hook-kind tracepoint` selects it; this machine forbids trampolines). In one
  3-round run against the build before (`--compare`, on this machine at a slow hour:
  all figures some 2.3 times those above), one record instead of two for the exchange
  and the close, the socket's addresses and ports in one kernel read instead of five
  and a write's `iov_iter` in one instead of four took the programs from 11.95 to
  11.26 µs per connection (the accept hook 1.85 → 1.57 µs, the state hook 3.90 →
  3.59 µs). A server's first write is read for a TLS handshake record (0.52 µs here);
  gating that read on ports where the segment program had seen a ClientHello arrive
  was tried and dropped: finding the hello put 0.48 µs back into the segment program
  (the first data segments' payload read through helper calls) and 0.03 µs on every
  data segment of keep-alive connections.
- **Servers not traced, a new connection per request.** Every connection on the
  machine passes the state hook (ten state changes, both ends) and the accept hook.
  A passive connection now gets a state only on a port a traced process listens on
  (marked from the traced processes' listeners at the start, as a traced process
  begins listening, and at an accept that found no state); the arms for a FIN and a
  close look a socket up only when its port (at the close, its source port) is
  marked, those for a socket established from SYN_SENT only while a traced connect is
  under way; the accept hook returns before walking the file table for a caller the
  CPU already knows is not traced. In one 3-round run against the build before
  (`--compare`, a slow hour: a program that does nothing took about 80 ns per run), a
  bystander nginx with a new connection per request (`--workload
  nginx-bystander-close`): the programs 4.91 → 3.86 µs per connection, the state hook
  1.48 → 0.94 µs (ten runs at about the cost of running at all), the accept hook 0.71
  → 0.20 µs; the traced nginx with a new connection per request 7.19 → 6.81 µs (the
  state hook 2.13 → 1.88 µs). What a bystander's connection still costs is some 44
  program runs at that floor — the state hook and its setup twin ten each, the
  record-layer program ten, the segment hook five, the socket calls six: fewer runs,
  not cheaper ones, would take it further. For a traced accept, the walk from the task
  to its file table is now three loads in place where the kernel hands the task as a
  typed pointer (5.11+): the accept hook 1.01 → 0.91 µs in one 3-round run, 1.33 →
  1.00 µs in another whose two builds' identical state hooks differed by a fifth — a
  tenth or so, within this machine's noise. Reading the connection's namespace at its
  establishment instead of at accept (two loads in place instead of two helper
  reads) was tried and undone: the state hook paid what the accept hook saved.
- **Accept and segments as cgroup programs (after the tables above were made).** This
  machine permits neither BPF trampolines nor kprobes, so accept was hooked on the
  syscall tracepoints, which send every system call of every process through the
  kernel's tracing path: `perf bench syscall basic` took 154 ns per call untraced, 190 ns
  with that build attached to nginx. Accept is now hooked where accept() fills in the
  peer's address for its caller (cgroup `getpeername4`/`getpeername6` programs on the
  traced processes' cgroups): 144 ns with the tracer attached, no tax (this bench's own
  measure: +0.8 to +5.7 ns over four runs, its noise). The accept hook costs what it
  did (733–905 ns per accept against 940 ns for the syscall tracepoint at the same
  hour): most of it is the state lookup and the open event, not the file-table walk.
  A server that asks accept() for no address (libuv's) has its first such connection
  taken at its first read, counted (`unseen_accepts`), and the syscall tracepoints
  added within 50 ms. Then the segment hook became a cgroup socket-buffer program on
  the root cgroup that also follows TLS records, reading the TCP header in place and
  keying the state by the socket's address without a helper call: one program run per
  received segment where `tcp_probe` and the record-layer program took two. In one
  3-round run against the build with the accept change alone (`--compare`, a slow
  hour: a program that does nothing took about 82 ns per run): nginx keep-alive 1.79 →
  1.65 µs of programs per request (segment work 462 → 338 ns), a new connection per
  request 7.35 → 6.87 µs (1585 → 1240 ns), a bystander nginx on keep-alive 1.00 → 0.85
  µs. A first version that looked up every segment of a traced port, a listener's and
  a closing connection's included, and read the header through helper calls, cost
  more per new connection than the two programs it replaced (1591 against 1315 ns).
- **Cgroup programs only where the traced sockets are.** The segment program was
  attached to the root cgroup, so it ran for every packet received on the machine and
  turned most of them away. It now runs on the cgroups of the traced processes and of
  their listeners (found with each listening socket's cgroup from sock_diag) — the
  root only with `--port` and `--all` — and the bench runs each server in a cgroup of
  its own, as services and containers run. In one 3-round run against the build before
  (`--compare`): nginx keep-alive 1.82 → 1.74 µs of programs per request (the segment
  program 2 → 1 runs: the load generator's segments no longer pass it), a new
  connection per request 6.95 → 6.67 µs (segments 1024 → 651 ns), a bystander nginx
  on keep-alive 0.88 → 0.70 µs and with a new connection per request 3.45 → 2.65 µs
  (its segments cost nothing now). Then the second look at connection setups (the
  state hook is skipped when a softirq interrupts it, see the README) became a
  socket-operation program on those same cgroups, told of each passive connection
  just before the kernel's state change and never skipped, in place of a twin on the
  state tracepoint that ran for every state change of every socket: in one 3-round run
  against the build before, a bystander nginx with a new connection per request 2.89 →
  2.04 µs (the twin's ten runs, 823 ns, gone), the traced nginx 6.50 → 6.29 µs (the
  new program runs four times per connection, 829 ns, as the kernel asks it for the
  listener's initial timeout, window and ECN too; the state hook 2417 → 2008 ns, its
  setup arm finding the work done). Two cuts on the
  traced connection's path followed: the segment program looks at the first byte a
  client sends (one helper call per connection) and marks a connection that begins
  with no TLS handshake record, whose server's first write then need not be read to
  tell (the write-start hook 915 → 513 ns per connection); and accept on the peer's
  address, which holds the socket as a typed pointer, loads its addresses, ports and
  namespace in place instead of through three helper reads (805 → 636 ns). Against the
  build with cgroup-following alone, in one 3-round run: a new connection per request
  6.79 → 5.87 µs of programs (7.67 → 6.73 µs with the tracer's process), a bystander
  with a new connection per request 2.73 → 1.99 µs. The state hook's close loading
  the addresses in place too (the tracepoint types the socket): 2225 → 2052 ns per
  connection, 6.55 → 6.22 µs of programs, in one 3-round run at a slower hour.
- **State changes from the socket-operation program.** The state tracepoint ran for
  every state change of every socket on the machine: ten per connection (both ends of
  a loopback connection, and every bystander's). Where a TCP iterator may set a
  socket's operation flags (6.12+; this machine, and Debian's 6.12 in `vm-test`), the
  socket-operation program on the traced cgroups takes the traced connections' state
  changes instead: it asks the kernel for them as each connection is established or
  connects, the iterator asks for them on the connections already open (in every
  network namespace, at the start and for every cgroup added), and the tracepoint is
  not attached. The program runs eight times per traced connection (the listener's
  initial timeout, window and ECN, the establishment, four state changes), the
  tracepoint ran ten times and the setups program four. In one 3-round run against the
  build before: a new connection per request 7.44 → 6.01 µs of programs (8.81 → 7.08
  µs with the tracer's process; the state work 3.45 → 2.52 µs), a bystander nginx with
  a new connection per request 2.09 → 0.97 µs (the state hook's 1.09 µs gone: what is
  left is the send and receive tracepoints every socket passes); in a second run, at a
  slower hour, 7.53 → 7.10 and 2.20 → 1.12 µs. Keep-alive does not change (no state
  change per request).
- **Labels in the tracer's process.** With `--labels` the tracer's process read each
  request's and response's first bytes with a parser that searched a list of methods
  by splitting it, looked for line ends a byte at a time, built a label in three
  buffers and copied it into a fourth to make it printable, and copied it once more to
  find its endpoint. A method is now matched as a constant, line ends are found a word
  at a time, a label is built in one buffer that becomes its string when it is
  printable ASCII, and an endpoint is found by the label as it is. In one 3-round run
  against the build before, both labelling (`--compare-arg=--labels`, nginx
  keep-alive, a slow hour: every figure about twice the tables above): 5.89 → 4.85 µs
  per request with the tracer's process (the process 2.14 → 1.35 µs, the programs 3.75
  → 3.50 µs); labels then add 2.13 µs per request over the tracer without them, 1.24 of
  it in the programs (copying the bytes to the ring).
- **Per-thread bookkeeping without upstreams (tried, not kept).** To bind upstream
  requests to the server request a thread works for, the receive hook notes each
  request's read in a per-thread map and the write-start hook looks the thread up
  again as the response begins: two lookups per request, for servers that never call
  an upstream as for those that do. Skipping both until a traced process has an
  upstream connection cut the programs' time on nginx keep-alive by about a tenth
  (machine-wide run time per request, `bpf_stats`, 5 s of `wrk -t1 -c16` per run, the
  two builds alternating at a slow hour: 2.14 → 1.87 µs in median over 8 pairs, 2.26
  → 2.00 µs over 6 pairs in the other order; a 3-round `--compare` in the same hour
  gave the opposite, within its rounds' spread). But it was not exact: an event loop
  that read a request before the first upstream connection opened, and another after
  it, would bind the first one's upstream request to the second. Skipping only the
  response's lookup is exact (the request a thread last read stays its current one,
  which the binding then refuses as answered), and saved nothing measurable (2.08 µs
  with it, 2.00 without, over 6 pairs). Neither was kept; a test now holds the first
  upstream call of a server traced while it had none attributed to its request. In
  the tracer's process, labelling checked every byte of a label with the Unicode
  character test (7% of its time per labelled request); printable ASCII is now told
  by a few compares.
- **Labels: one record fewer per request.** With `--labels` the read that begins a
  request on a kept-alive connection reported the exchange before it (one record) and
  copied the new request's first bytes (another). The exchange is now written beside
  the copy, in the same per-CPU buffer, and both go to the ring as one record (the
  exchange alone when no bytes are copied), where the receive hook is a tracepoint
  (no other program run on the CPU can take the buffer in between; from trampolines
  and the TLS library's probes the two still go apart); the tracer takes them apart
  in place.
  Three records per labelled request become two. Small, in alternating runs of the two
  builds at a slow hour (nginx keep-alive, `--labels`): the programs 2.77 → 2.71 µs per
  request in median over 5 pairs (the receive hook 936 → 899 ns), the tracer's
  process 0.96 → 0.93 µs over 4 pairs.
- **Uprobes (HTTPS).** A request on nginx over TLS with keep-alive makes three calls
  that the tracer hooks in OpenSSL: `SSL_read` twice (the request, then the read that
  finds nothing more) and `SSL_write` once, each with an entry and a return probe: six
  probe hits per request. Every hit is a trap: the breakpoint written over the
  function's first instruction enters the kernel, which finds the probe, runs the
  program and resumes the function; the return probe has replaced the return address
  with a trampoline that enters the kernel once more on the way back. The BPF
  statistics count only the programs (six runs, 1.8 µs per request); the traps are paid
  by the traced server and show only in its own CPU time. In a 3-round run of this
  workload alone, nginx's worker spent 11.7 µs per request untraced, 12.6 µs with the
  tracer without uprobes (`--skip-hook-kind uprobe`: the kernel hooks alone) and 36.2 µs
  with them: +24 µs per request (rounds: +22 to +25; three quarters of it system time),
  some 3.7 µs per probe hit beyond its program on this virtual machine, where the
  untraced server against itself moved by −0.5 µs (−0.6 to +1.7). Throughput followed:
  37% of untraced with uprobes (rounds: 29–39%), 74% without (53–90%), and with against
  without in the same rounds 52% (41–55%); the untraced server against itself 84%
  (66–98%). The cost goes with the calls into OpenSSL, not with the bytes: a request
  that costs the server more than this small static file pays the same some 24 µs, a
  smaller share of it.
- **What limits it now.** About 55 ns of every program run is paid before the program
  does anything (a program that returns at once measured 50–60 ns per run here, most of
  it the clock reads of `bpf_stats_enabled` itself on this virtual machine); six runs
  make that about 0.33 µs per request. Beyond that the cost is cache lines moving
  between the two CPUs: the application writes a connection's state on one CPU and its
  segments' softirq on the other (the request's arrival, the response's
  acknowledgement), and each event is written into ring lines the tracer last read.
  Tried and dropped: a direct-mapped pre-filter of tracked sockets (slower for traced
  hits than the misses it saved), a port-based pre-filter when reading the port was
  a helper call (the segment hook's, above, reads it with one typed load), two
  significant digits instead of three in the histograms (no measurable gain), and
  socket-local storage
  (`bpf_sk_storage_get`, no hashing) in place of the hash map: the segment hook 18 ns
  cheaper per run, the receive hook 13 ns dearer, 0.88 against 0.90 µs of BPF per
  request in the same rounds — not worth a second store, since the hash map stays
  where programs are not BTF-typed (raw tracepoints, kprobes, the accept syscall).
- **Throughput** is measured with the statistics off (a second run per round), yet it
  moves by ten points and more from run to run. The last row of each table is the
  untraced server set against itself in the same rounds: ideally 100% with a narrow
  range; in a 5-round run before this one it measured 98.4% with rounds from 81% to
  120% on nginx keep-alive (99.6%, 93–120%, with a connection per request). A two-point
  target is finer than this comparison resolves here. Single runs of the untraced
  server spread by ±15%, as much with nginx and wrk pinned to separate CPUs or counted
  per busy CPU second. What the tracer's share is made of, builds set against each
  other in the same rounds: the same hooks with programs that return at once 99.4%
  (full tracer 89.9%), and 95.5% (rounds 89–118%) in another run of 15 rounds; the
  least a per-request timing can do — one socket lookup, one clock read and one store
  per hook, no events — 91.4% (86–94%; full tracer 84.8%), and 91.3% (70–115%) over
  15 rounds; all the programs' work without events 94.3% (89.3%). In CPU: at some
  115,000 requests per second the two CPUs spend about 17 µs per request between nginx,
  wrk and the kernel, so two points are about 0.35 µs per request for all an observer
  adds, and that least timing alone, six program runs on loopback, costs about 0.3 µs
  (0.65 µs with the statistics' own clock reads). bpftrace, computing think time alone
  with two hooks, measured 76–92% over these sessions. The load generator is one wrk
  thread on one of the two CPUs, so the program runs on its side (its sends and
  receives, and the softirq that delivers its requests and runs the segment hook for
  nginx's socket) come out of its budget; a server whose clients are on other machines
  pays for its own end only.
- **The alternatives.** The capture's cost per request misses the kernel's copy of every
  packet into the capture buffer, which is paid in the traffic's own context; its effect
  shows in the throughput column. bpftrace measures think time only (two hooks, no
  per-request state beyond one map entry). mitmproxy terminates and re-issues every
  request in Python: an order of magnitude less throughput.
";

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 4s test @ http://127.0.0.1:8080/index.html
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   310.00us  100.00us   2.00ms   90.00%
  Latency Distribution
     50%  290.00us
     75%  350.00us
     90%  400.00us
     99%    1.20ms
  123456 requests in 4.00s, 100.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  30864.00
Transfer/sec:     25.00MB
";

    #[test]
    fn parses_wrk() {
        let s = parse_wrk(WRK).unwrap();
        assert_eq!((s.rps, s.requests, s.p50_us, s.p99_us, s.errors), (30864.0, 123456.0, 290.0, 1200.0, 3));
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(range(&[0.9, 0.84, 0.95, 0.88]), (0.84, 0.95));
        assert_eq!(range(&[1.02]), (1.02, 1.02));
    }

    #[test]
    fn untraced_again_is_compared_with_the_rounds_first_run() {
        let run = |rps: f64| Sample { rps, requests: rps * 4.0, ..Sample::default() };
        let mut samples = BTreeMap::new();
        samples.insert(Config::Untraced, vec![run(100_000.0), run(120_000.0), run(90_000.0)]);
        samples.insert(Config::Tracer, vec![run(90_000.0), run(96_000.0), run(81_000.0)]);
        samples.insert(Config::UntracedAgain, vec![run(95_000.0), run(126_000.0), run(90_000.0)]);
        let rows = rows(&samples);
        let again = rows.iter().find(|r| r.config == Config::UntracedAgain).unwrap();
        assert!((again.throughput_ratio - 1.0).abs() < 1e-9);
        assert_eq!(again.throughput_range, (0.95, 1.05));
        let tracer = rows.iter().find(|r| r.config == Config::Tracer).unwrap();
        assert!((tracer.throughput_ratio - 0.9).abs() < 1e-9);
        let mut out = String::new();
        table(&mut out, &rows);
        let line = out.lines().find(|l| l.starts_with("| untraced again")).unwrap();
        assert!(line.contains("| 100.0% (95–105) |"), "{line}");
        assert!(line.contains("| – | – |"), "no CPU for an unobserved run: {line}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
#[cfg(test)]
mod render_tests {
    use super::*;

    /// BENCHMARKS.md for `results`, two rounds of the default options, a system call
    /// 10 ns dearer with the tracer.
    fn rendered(results: &BTreeMap<Workload, BTreeMap<Config, Vec<Sample>>>) -> String {
        let opts = Options {
            rounds: 2,
            seconds: 4,
            connections: 16,
            scale_open: 0,
            scale_short: 0,
            only_tracer: false,
            out: None,
            tracer: None,
            compare: None,
            compare_args: vec![],
            workload: vec![],
        };
        let syscalls = SyscallCost {
            untraced_ns: 100.0,
            traced_ns: 110.0,
            read_untraced_ns: 170.0,
            read_all_ns: 190.0,
            doctor: "taxed: accept from the syscall tracepoints".into(),
        };
        render(&opts, results, &syscalls, None)
    }

    #[test]
    fn uprobe_cost_sets_the_tracer_with_uprobes_against_without_in_the_same_rounds() {
        let run = |rps: f64, server_us: f64, ssl: Option<(f64, f64)>| {
            let requests = rps * 4.0;
            let mut s = Sample {
                rps,
                requests,
                server_user_ns: 0.6 * server_us * requests * 1e3,
                server_sys_ns: 0.4 * server_us * requests * 1e3,
                server_requests: requests,
                tls: ssl.map(|_| ("OpenSSL uprobes".to_owned(), 32.0)),
                ..Sample::default()
            };
            if let Some((runs, ns)) = ssl {
                s.programs.insert("ssl_read".into(), (ns * requests / 2.0, runs * requests / 2.0));
                s.programs.insert("ssl_return".into(), (ns * requests / 2.0, runs * requests / 2.0));
            }
            s.programs.insert("tcp_probe".into(), (300.0 * requests, 2.0 * requests));
            s
        };
        let mut samples = BTreeMap::new();
        samples.insert(Config::Untraced, vec![run(20_000.0, 40.0, None), run(22_000.0, 40.0, None)]);
        samples.insert(
            Config::Tracer,
            vec![run(16_000.0, 48.0, Some((6.0, 1_000.0))), run(17_600.0, 50.0, Some((6.0, 1_000.0)))],
        );
        samples.insert(Config::TracerNoUprobes, vec![run(18_000.0, 42.0, None), run(19_800.0, 42.0, None)]);
        samples.insert(Config::UntracedAgain, vec![run(20_000.0, 40.5, None), run(22_000.0, 39.5, None)]);
        let mut out = String::new();
        uprobe_cost(&mut out, &samples, 16);
        assert!(out.contains("with uprobes 88.9% (rounds: 88.9–88.9%) of the tracer without them"), "{out}");
        assert!(out.contains("against untraced 80.0% (rounds: 80.0–80.0%) with them, 90.0%"), "{out}");
        assert!(out.contains("40.00 µs untraced, 42.00 µs traced without uprobes, 49.00 µs with them"), "{out}");
        assert!(out.contains("the uprobes add +7.00 µs (rounds: +6.00 to +8.00) per request"), "{out}");
        assert!(out.contains("ran 6.00 times per request for 1.00 µs"), "{out}");
        assert!(out.contains("remaining +6.00 µs"), "{out}");
        assert!(out.contains("+0.00 µs (rounds: -0.50 to +0.50) in server CPU"), "{out}");
        assert!(out.contains("with uprobes OpenSSL uprobes (32 handshakes"), "{out}");
        assert!(!out.contains("Not without uprobes"), "{out}");
        // A tracer that attaches its uprobes despite being told not to is called out.
        samples.insert(
            Config::TracerNoUprobes,
            vec![run(18_000.0, 42.0, Some((6.0, 500.0))), run(19_800.0, 42.0, Some((6.0, 500.0)))],
        );
        let mut out = String::new();
        uprobe_cost(&mut out, &samples, 16);
        assert!(out.contains("**Not without uprobes**"), "{out}");
    }

    /// A run at 50,000 req/s whose machine spent `cpu_us` per request; `answered` of the
    /// 200,000 requests due.
    fn fixed_run(cpu_us: f64, answered: u64) -> Sample {
        let fixed = paced::PacedRun {
            rate: 50_000.0,
            answered,
            errors: 200_000 - answered,
            seconds: 4.0,
            busy_ns: cpu_us * answered as f64 * 1e3,
            cpus: 2.0,
        };
        Sample { rps: 100_000.0, requests: 400_000.0, fixed: Some(fixed), ..Sample::default() }
    }

    #[test]
    fn machine_cpu_at_a_fixed_rate_is_set_against_untraced_in_the_same_round() {
        let run = |cpu_us| fixed_run(cpu_us, 200_000);
        let mut samples = BTreeMap::new();
        samples.insert(Config::Untraced, vec![run(20.0), run(22.0)]);
        samples.insert(Config::Tracer, vec![run(21.0), run(23.5)]);
        samples.insert(Config::Bpftrace, vec![run(21.5), run(24.0)]);
        samples.insert(Config::UntracedAgain, vec![run(20.2), run(21.8)]);
        let fixed = FixedRate::new(&samples).unwrap();
        let mut out = String::new();
        fixed_rate_table(&mut out, &fixed);
        assert!(out.contains("Machine CPU/request at 50000 req/s (fixed rate):"), "{out}");
        assert!(
            out.contains("| tracer (all phases) | 22.25 µs (21.00–23.50) | +1.25 µs (+1.00–+1.50) | 50000 | 56% | 0 |"),
            "{out}"
        );
        assert!(out.contains("| untraced | 21.00 µs (20.00–22.00) | – | 50000 | 52% | 0 |"), "{out}");
        assert!(out.contains("100.0% (rounds: 99.1–101.0%) — within ±5%"), "{out}");
        let mut out = String::new();
        true_cpu_target(&mut out, "nginx keep-alive", &fixed, Config::Bpftrace);
        assert_eq!(
            out.trim_end(),
            "- True CPU per request (fixed rate) ≤ bpftrace think-only's in the same rounds, nginx keep-alive at \
             50000 req/s: tracer 22.25 µs (+1.25 µs over untraced), bpftrace 22.75 µs (+1.75 µs over untraced); \
             tracer − bpftrace -0.50 µs (rounds: -0.50 to -0.50) — **met**"
        );
        // A new connection per request is set against the packet capture.
        let mut capture = samples.clone();
        capture.insert(Config::Capture, vec![run(20.5), run(23.0)]);
        let mut out = String::new();
        true_cpu_target(&mut out, "a new connection per request", &FixedRate::new(&capture).unwrap(), Config::Capture);
        assert_eq!(
            out.trim_end(),
            "- True CPU per request (fixed rate) ≤ tcpdump -w's in the same rounds, a new connection per request at \
             50000 req/s: tracer 22.25 µs (+1.25 µs over untraced), tcpdump 21.75 µs (+0.75 µs over untraced); \
             tracer − tcpdump +0.50 µs (rounds: +0.50 to +0.50) — **not met**"
        );
        // Without bpftrace (--only-tracer) there is nothing to judge against.
        let mut only = samples.clone();
        only.remove(&Config::Bpftrace);
        let mut out = String::new();
        true_cpu_target(&mut out, "nginx keep-alive", &FixedRate::new(&only).unwrap(), Config::Bpftrace);
        assert!(
            out.ends_with("untraced); bpftrace was not measured in this run (--only-tracer) — no verdict\n"),
            "{out}"
        );
        // A run that fell behind the rate is no verdict either.
        samples.insert(Config::Tracer, vec![run(21.0), fixed_run(23.5, 150_000)]);
        let fixed = FixedRate::new(&samples).unwrap();
        let mut out = String::new();
        true_cpu_target(&mut out, "nginx keep-alive", &fixed, Config::Bpftrace);
        assert!(out.ends_with("— no verdict: 1 runs fell behind the rate\n"), "{out}");
        fixed_rate_table(&mut out, &fixed);
        assert!(out.contains("| 43750 (behind the rate in 1 of 2 rounds) | 48% | 50000 |"), "{out}");
        assert!(!out.contains("busy or more"), "{out}");
        // A machine whose CPUs were saturated (by other work too) says nothing of the cost.
        samples.insert(Config::Tracer, vec![run(21.0), run(38.5)]);
        let fixed = FixedRate::new(&samples).unwrap();
        let mut out = String::new();
        true_cpu_target(&mut out, "nginx keep-alive", &fixed, Config::Bpftrace);
        assert!(out.ends_with("— no verdict: in 1 runs the CPUs were 95% busy or more\n"), "{out}");
        fixed_rate_table(&mut out, &fixed);
        assert!(out.contains("**In 1 runs the CPUs were 95% busy or more**"), "{out}");
    }

    #[test]
    fn a_control_beyond_five_percent_claims_no_verdict() {
        let run = |cpu_us| fixed_run(cpu_us, 200_000);
        let mut samples = BTreeMap::new();
        samples.insert(Config::Untraced, vec![run(20.0), run(22.0)]);
        samples.insert(Config::Tracer, vec![run(21.0), run(23.5)]);
        samples.insert(Config::Bpftrace, vec![run(21.5), run(24.0)]);
        samples.insert(Config::UntracedAgain, vec![run(22.0), run(24.0)]);
        let fixed = FixedRate::new(&samples).unwrap();
        assert!(!fixed.judges());
        let mut out = String::new();
        fixed_rate_table(&mut out, &fixed);
        assert!(out.contains("**This run cannot judge machine CPU per request**"), "{out}");
        let mut out = String::new();
        true_cpu_target(&mut out, "nginx keep-alive", &fixed, Config::Bpftrace);
        assert!(out.ends_with("— no verdict: the control is 109.5% (rounds: 109.1–110.0%), beyond ±5%\n"), "{out}");
        assert!(!out.contains("met**"), "{out}");
        // The rendered Targets carry the same: no met, no not met, for this target.
        let mut results = BTreeMap::new();
        results.insert(Workload::NginxKeepAlive, samples);
        let text = rendered(&results);
        let target = text.lines().find(|l| l.starts_with("- True CPU per request (fixed rate)")).unwrap();
        assert!(target.ends_with("beyond ±5%"), "{target}");
    }

    #[test]
    fn targets_give_each_verdict_with_its_rounds_and_the_control() {
        let run = |rps: f64, cpu: f64| Sample {
            rps,
            requests: rps * 4.0,
            cpu_ns: cpu * rps * 4.0 * 1e3,
            bpf_ns: 0.8 * cpu * rps * 4.0e3,
            events: Some(rps * 8.0),
            requests_observed: rps * 8.0,
            lost: Some(0.0),
            ..Sample::default()
        };
        let mut results = BTreeMap::new();
        for w in Workload::ALL {
            let mut samples = BTreeMap::new();
            samples.insert(Config::Untraced, vec![run(100_000.0, 0.0), run(120_000.0, 0.0)]);
            samples.insert(Config::Tracer, vec![run(90_000.0, 0.9), run(96_000.0, 1.0)]);
            samples.insert(Config::Bpftrace, vec![run(91_000.0, 1.0), run(97_000.0, 1.2)]);
            samples.insert(Config::UntracedAgain, vec![run(95_000.0, 0.0), run(126_000.0, 0.0)]);
            results.insert(w, samples);
        }
        let text = rendered(&results);
        let lines: Vec<&str> = text.lines().collect();
        let has = |line: &str| assert!(lines.contains(&line), "no line {line:?} in:\n{text}");
        has("- Throughput ≥ 95% of untraced, nginx keep-alive: 85.0% (rounds: 80.0–90.0%) — **not met** \
             (the untraced server against itself: 100.0% (rounds: 95.0–105.0%))");
        has("- The programs' CPU per request ≤ 0.8 × bpftrace think-only's, nginx keep-alive: 0.76 µs \
             against 0.88 µs (0.86×) — **not met**");
        has("- CPU per request ≤ tcpdump -w's in the same rounds and ≤ 2.5 µs, a new connection per request: \
             0.95 µs (rounds: 0.90–1.00); tcpdump not measured in this run (--only-tracer) — **met** for ≤ 2.5 µs; \
             no verdict against tcpdump");
        for how in ["keep-alive", "a new connection per request"] {
            has(&format!(
                "- A bystander server's throughput within its own control ({how}): 85.0% (rounds: 80.0–90.0%) — \
                 **not met** (the untraced server against itself: 100.0% (rounds: 95.0–105.0%))"
            ));
            has(&format!(
                "- The programs' time on a bystander's sockets ≤ 0.2 µs per request ({how}): 0.76 µs — **not met**; \
                 the tracer counted – of its requests"
            ));
        }
        has("- Zero lost events (LabKeepAlive): 0 lost — **met**");
        assert!(text.contains(
            "System-call tax while attached: 0 ns (no syscall tracepoint) — **not met**: the doctor says \"taxed: \
             accept from the syscall tracepoints\"; measured +10.0 ns per system call here"
        ));
        assert!(text.contains("took 100.0 ns untraced and 110.0 ns with it attached: +10.0 ns"));
    }
}
