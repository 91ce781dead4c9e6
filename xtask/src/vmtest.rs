//! `cargo xtask vm-test`: the tracer on Debian's own kernels, each booted under qemu
//! (software emulation) with an initramfs holding static builds of the tracer and the
//! lab. Inside, for each way of choosing hooks (the default, then raw tracepoints and
//! trampolines, then kprobes), `tracer doctor` reports the hooks and phases and a subset
//! of the accuracy scenarios runs (slow-think, body-stall, slow-accept, slow-reader,
//! blocked-write); the host checks each phase against the injected delay, and what the
//! programs read from sockets against what the client's own sockets say, and prints a
//! table per kernel.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, exec, setup, workspace_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Kernel series to test (repeatable): 5.10, 6.1, 6.12.
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Seconds to let one virtual machine run before giving up.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT)]
    pub timeout: u64,
}

const DEFAULT_TIMEOUT: u64 = 900;

impl Default for Options {
    fn default() -> Self {
        Self { kernels: Vec::new(), timeout: DEFAULT_TIMEOUT }
    }
}

/// Debian's cloud kernels: series and the suite that ships it.
const KERNELS: &[(&str, &str)] = &[("5.10", "bullseye"), ("6.1", "bookworm"), ("6.12", "trixie")];

const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
];

const MUSL: &str = "x86_64-unknown-linux-musl";

/// One accuracy scenario: the lab server's and client's arguments, the phase the
/// injected delay must land in, the delay, and how many samples of it there must be.
struct Scenario {
    name: &'static str,
    server: &'static str,
    client: &'static str,
    phase: &'static str,
    delay_ms: f64,
    samples: u64,
}

// Under emulation the lab's own work between the injected delays takes milliseconds
// (tens when the host is busy), so a phase is judged against what the client itself
// saw per exchange (see `judge`) as well as against the delay.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "slow-think",
        server: "--scenario slow-think --delay-ms 100",
        client: "--connections 2 --requests 5",
        phase: "think",
        delay_ms: 100.0,
        samples: 10,
    },
    Scenario {
        name: "body-stall",
        server: "--scenario body-stall --delay-ms 100",
        client: "--requests 10 --size 10",
        phase: "send",
        delay_ms: 100.0,
        samples: 10,
    },
    Scenario {
        name: "slow-accept",
        server: "--scenario slow-accept --delay-ms 200",
        client: "--connections 10",
        phase: "accept_wait",
        delay_ms: 200.0,
        samples: 10,
    },
    // A small receive window and a late reader: the response waits for the peer's
    // acknowledgements, read with sequence numbers from the socket and the ACK.
    Scenario {
        name: "slow-reader",
        server: "--scenario slow-reader",
        client: "--connections 4 --size 20000 --read-delay-ms 200 --rcvbuf 4096",
        phase: "delivery",
        delay_ms: 200.0,
        samples: 4,
    },
    // One write blocked on a full 16 KiB send buffer while the client waits to read:
    // `send` from the write's start (the write-start hook), not `think`.
    Scenario {
        name: "blocked-write",
        server: "--scenario blocked-write --response-size 131072",
        client: "--requests 4 --size 131072 --read-delay-ms 200 --rcvbuf 16384",
        phase: "send",
        delay_ms: 200.0,
        samples: 4,
    },
];

/// HTTPS in the guest: Debian's nginx, linked with OpenSSL, serves each protocol
/// version on a port of its own.
const TLS_PORTS: &[(u16, &str)] = &[(8443, "TLSv1.3"), (8444, "TLSv1.2")];
/// Where the guest finds nginx's configuration, the certificate and its key.
const TLS_DIR: &str = "/etc/tracer-vm";
/// Host programs copied into the initramfs with every library they link, at the same
/// paths (the dynamic loader too).
const HOST_PROGRAMS: &[&str] = &["/usr/sbin/nginx", "/usr/bin/curl"];

/// Ways to run the tracer on each kernel: a name and the options. The kinds skipped
/// make each hook take its next implementation: raw tracepoints and trampolines (accept
/// from inet_csk_accept), then kprobes (send and receive on kernels
/// without their tracepoints; accept from a return probe).
const PASSES: &[(&str, &str)] = &[
    ("default", ""),
    ("raw_tp+fexit", "--skip-hook-kind tp_btf,tracepoint"),
    ("kprobe", "--skip-hook-kind fentry,tracepoint"),
];

fn vm_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// `program` (apt-get or apt-cache) on the suites' own lists under target/vm/apt.
fn apt_with(program: &str) -> Command {
    let dir = vm_dir().join("apt");
    let mut cmd = Command::new(program);
    cmd.arg("-q")
        .arg(format!("-oDir::Etc::sourcelist={}", dir.join("sources.list").display()))
        .arg("-oDir::Etc::sourceparts=/dev/null")
        .arg(format!("-oDir::State::Lists={}", dir.join("lists").display()))
        .arg(format!("-oDir::Cache={}", dir.join("cache").display()));
    cmd
}

fn apt(args: &[&str]) -> Command {
    let mut cmd = apt_with("apt-get");
    cmd.args(args);
    cmd
}

/// Package lists of the three suites, in a place of their own (the machine's apt
/// configuration is left alone).
fn apt_lists() -> Result<()> {
    let dir = vm_dir().join("apt");
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let sources: String = KERNELS
        .iter()
        .map(|(_, suite)| format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main\n"))
        .collect();
    fs::write(dir.join("sources.list"), sources)?;
    exec(apt(&["update"]).stdout(Stdio::null()))
}

/// The newest cloud kernel package of `series`, unpacked; its vmlinuz.
fn kernel(series: &str) -> Result<PathBuf> {
    let out = apt_with("apt-cache")
        .args([
            "search",
            "--names-only",
            &format!("^linux-image-{}\\.[0-9.+a-z-]+-cloud-amd64-unsigned$", series.replace('.', "\\.")),
        ])
        .output()?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort_by_key(|n| {
        n.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u64>().ok()).collect::<Vec<_>>()
    });
    let package = names.pop().with_context(|| format!("no cloud kernel package for Linux {series}"))?;
    let dir = vm_dir().join("kernels").join(&package);
    if !dir.join("boot").exists() {
        eprintln!("vm-test: fetching {package}");
        fs::create_dir_all(&dir)?;
        exec(apt(&["download", &package]).current_dir(&dir).stdout(Stdio::null()))?;
        let deb = fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("no .deb")?;
        exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
        fs::remove_file(deb)?;
    }
    fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .context("no vmlinuz in the kernel package")
}

/// Shell functions of the init script. `ready SECONDS FILE TEXT PID` waits until FILE
/// holds TEXT (status 0), the process PID has exited (1) or SECONDS have passed (2);
/// `now` is the time since boot in hundredths of a second.
const READY: &str = "now() { cut -d' ' -f1 /proc/uptime | tr -d .; }
ready() {
  end=$(($(now) + $1 * 100))
  until grep -qs \"$3\" \"$2\"; do
    kill -0 $4 2>/dev/null || return 1
    [ $(now) -lt $end ] || return 2
    sleep 0.2
  done
}
";

/// How long the server and the tracer may take to say they are ready, in seconds
/// (the tracer takes 3 to 5 under emulation on a busy host).
const READY_TIMEOUT: u32 = 60;

/// The init script: per pass, doctor, then each scenario traced; results between
/// markers on the serial console. The client starts only once the server listens and
/// the tracer has said, in a file of this scenario's own, that it is tracing; when
/// either is not ready in time, the scenario's result says why (`not ready: …`) and
/// the client does not run.
fn init_script() -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\nmkdir -p /tmp\n\
         ip link set lo up\n",
    );
    s.push_str(READY);
    s.push_str("echo '=== kernel' $(uname -r)\n");
    let wait = READY_TIMEOUT;
    for (pass, options) in PASSES {
        let _ = write!(s, "echo '=== doctor {pass}'\ntracer doctor {options}\necho \"=== doctor-exit {pass} $?\"\n");
        for sc in SCENARIOS {
            let (name, server, client) = (sc.name, sc.server, sc.client);
            // The previous scenario's files go first: a background job opens its own
            // only once it runs, and the old ones' lines (`tracer: tracing`) must not
            // be taken for this one's.
            let _ = write!(
                s,
                "rm -f /tmp/srv.out /tmp/trace.json /tmp/trace.err /tmp/client.out\nNOT_READY=\n\
                 lab server {server} > /tmp/srv.out &\nSRV=$!\n\
                 ready {wait} /tmp/srv.out 'listening on' $SRV\n\
                 case $? in 1) NOT_READY='the lab server exited before it listened';; \
                 2) NOT_READY='the lab server did not listen within {wait} s';; esac\n\
                 ADDR=$(cut -d' ' -f3 /tmp/srv.out 2>/dev/null)\n\
                 if [ -z \"$NOT_READY\" ]; then\n\
                 tracer {options} --connections --pid $SRV --output json > /tmp/trace.json 2> /tmp/trace.err &\nTP=$!\n\
                 ready {wait} /tmp/trace.err 'tracer: tracing' $TP\n\
                 case $? in 1) NOT_READY='the tracer exited before it was tracing';; \
                 2) NOT_READY='the tracer was not tracing within {wait} s';; esac\n\
                 if [ -z \"$NOT_READY\" ]; then\n\
                 lab client --server $ADDR {client} > /tmp/client.out\nsleep 1\nkill -INT $TP\n\
                 else kill -KILL $TP 2>/dev/null; fi\nwait $TP\nfi\n\
                 echo '=== result {pass} {name}'\n[ -n \"$NOT_READY\" ] && echo \"not ready: $NOT_READY\"\n\
                 echo \"server $ADDR\"\ncat /tmp/client.out 2>/dev/null\n\
                 grep -s '\"type\":\"connection\"' /tmp/trace.json\ngrep -s '\"type\":\"report\"' /tmp/trace.json | tail -1\n\
                 echo '=== stderr {pass} {name}'\ncat /tmp/trace.err 2>/dev/null\necho '=== end {pass} {name}'\n\
                 kill $SRV\nwait $SRV 2>/dev/null\n"
            );
        }
    }
    s.push_str("echo '=== done'\npoweroff -f\n");
    s
}

/// nginx's configuration in the guest: the master as root (no other user there), its
/// files under /tmp/nginx, an access log with each request's port, protocol and
/// connection, and a server per port of `TLS_PORTS`, each allowing one protocol
/// version and answering every request with a short body.
fn nginx_conf() -> String {
    let mut conf = String::from(
        "user root root;\nworker_processes 1;\ndaemon off;\npid /tmp/nginx/nginx.pid;\n\
         error_log /tmp/nginx/error.log notice;\nevents { worker_connections 64; }\nhttp {\n\
         log_format tls '$server_port $ssl_protocol $connection $status';\n\
         access_log /tmp/nginx/access.log tls;\n",
    );
    for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(conf, "{kind}_temp_path /tmp/nginx/{kind};");
    }
    let _ = writeln!(conf, "ssl_certificate {TLS_DIR}/cert.pem;\nssl_certificate_key {TLS_DIR}/key.pem;");
    for (port, version) in TLS_PORTS {
        let _ = writeln!(
            conf,
            "server {{\nlisten 127.0.0.1:{port} ssl;\nssl_protocols {version};\n\
             location / {{ return 200 \"hello over {version}\\n\"; }}\n}}"
        );
    }
    conf.push_str("}\n");
    conf
}

/// The paths of the libraries in `ldd`'s output (the dynamic loader's among them; the
/// vDSO has none).
fn ldd_paths(ldd: &str) -> Result<Vec<String>> {
    let mut paths = Vec::new();
    for line in ldd.lines() {
        let target = line.split_once("=>").map_or(line, |(_, t)| t).trim();
        if target.starts_with("not found") {
            bail!("ldd: {}", line.trim());
        }
        if let Some(path) = target.split_whitespace().next().filter(|p| p.starts_with('/')) {
            paths.push(path.to_owned());
        }
    }
    Ok(paths)
}

/// `HOST_PROGRAMS` and their libraries under `root`, at the paths the host has them
/// (each a regular file: the libraries' symbolic links are followed).
fn copy_host_programs(root: &Path) -> Result<()> {
    let mut files = Vec::new();
    for program in HOST_PROGRAMS {
        let out = Command::new("ldd").arg(program).output().with_context(|| format!("ldd {program}"))?;
        if !out.status.success() {
            bail!("ldd {program} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        files.push(program.to_string());
        files.extend(ldd_paths(&String::from_utf8_lossy(&out.stdout)).with_context(|| program.to_string())?);
    }
    files.sort();
    files.dedup();
    for file in files {
        let to = root.join(file.trim_start_matches('/'));
        fs::create_dir_all(to.parent().expect("a file has a parent"))?;
        fs::copy(&file, &to).with_context(|| format!("copying {file}"))?;
    }
    Ok(())
}

/// What nginx needs in the guest besides its libraries: its configuration, a
/// self-signed certificate (EC P-256, for localhost and 127.0.0.1) made with the host's
/// `openssl`, and the users and groups its `user` directive looks up.
fn tls_files(root: &Path) -> Result<()> {
    let dir = root.join(TLS_DIR.trim_start_matches('/'));
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("nginx.conf"), nginx_conf())?;
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .output()
        .context("running openssl (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let etc = root.join("etc");
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(etc.join("nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files\n")?;
    fs::write(etc.join("hosts"), "127.0.0.1 localhost\n")?;
    Ok(())
}

fn initramfs() -> Result<PathBuf> {
    let root = vm_dir().join("initramfs");
    let _ = fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    let bins = workspace_root().join("target").join(MUSL).join("release");
    for bin in ["tracer", "lab"] {
        fs::copy(bins.join(bin), root.join("bin").join(bin))?;
    }
    copy_host_programs(&root)?;
    tls_files(&root)?;
    fs::write(root.join("init"), init_script())?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;
    let image = vm_dir().join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | cpio -o -H newc --quiet > {}", root.display(), image.display()))
        .status()?;
    if !status.success() {
        bail!("building the initramfs failed");
    }
    Ok(image)
}

/// Boots `kernel` with the initramfs; the serial console's output.
fn boot(kernel: &Path, initrd: &Path, timeout: Duration) -> Result<String> {
    let mut child = Command::new("qemu-system-x86_64")
        // One host thread runs both virtual CPUs: with a thread each, the guest's live
        // code patching (static keys, the int3 protocol used when tracepoints are
        // enabled) raced under emulation and oopsed the guest now and then (seen at
        // boot, and in a tracer's attach at 23 s on 6.12).
        .args(["-accel", "tcg,thread=single", "-cpu", "max", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu")?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(reader.join().unwrap_or_default().replace('\r', ""))
}

/// The lines between `=== START` and the next `=== ` marker.
fn section<'a>(console: &'a str, start: &str) -> Option<Vec<&'a str>> {
    let mut lines = console.lines().skip_while(|l| !l.contains(start));
    lines.next()?;
    Some(lines.take_while(|l| !l.starts_with("=== ")).collect())
}

struct Outcome {
    kernel: String,
    passes: Vec<PassOutcome>,
}

struct PassOutcome {
    name: &'static str,
    hooks: Vec<String>,
    checks: Vec<(String, bool, String)>,
}

fn judge(series: &str, console: &str) -> Outcome {
    // The first console line may start with the terminal's escape sequences.
    let kernel =
        console.lines().find_map(|l| l.split_once("=== kernel ").map(|(_, k)| k)).unwrap_or("?").trim().to_owned();
    let mut passes = Vec::new();
    for (pass, _) in PASSES {
        let doctor = section(console, &format!("=== doctor {pass}")).unwrap_or_default();
        // The chosen implementation of each hook (not the lines saying why others were not).
        let hooks = doctor
            .iter()
            .skip_while(|l| !l.starts_with("hooks:"))
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.starts_with("    "))
            .map(|l| l.trim().to_owned())
            .collect();
        let mut checks = Vec::new();
        if !console.contains("=== done") {
            checks.push((
                format!("Linux {series} booted and finished"),
                false,
                "no '=== done' on the console".to_owned(),
            ));
        }
        for sc in SCENARIOS {
            let lines = section(console, &format!("=== result {pass} {}", sc.name)).unwrap_or_default();
            let what = format!("{}: {} p50 ≈ {} ms", sc.name, sc.phase, sc.delay_ms);
            let stderr = || section(console, &format!("=== stderr {pass} {}", sc.name)).unwrap_or_default().join(" | ");
            if let Some(why) = lines.iter().find_map(|l| l.strip_prefix("not ready: ")) {
                checks.push((what, false, format!("not run: {why}; tracer said: {}", stderr())));
                continue;
            }
            let report = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["type"] == "report");
            let Some(report) = report else {
                checks.push((what, false, format!("no report; tracer said: {}", stderr())));
                continue;
            };
            let listener = &report["listeners"][0];
            let value = &listener["phases"][sc.phase];
            if let Some(why) = value["unavailable"].as_str() {
                checks.push((what, false, format!("unavailable: {why}")));
                continue;
            }
            let p50 = value["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1e6;
            let count = value["count"].as_u64().unwrap_or(0);
            let seen = client_exchange_ms(&lines);
            let ok = count == sc.samples && within(p50, sc.delay_ms, seen);
            checks.push((
                what,
                ok,
                format!(
                    "{p50:.2} ms over {count} samples (expected {}); the client saw {seen:.2} ms per exchange",
                    sc.samples
                ),
            ));
            if sc.name == "slow-think" {
                checks.push(socket_reads(&lines));
            }
        }
        passes.push(PassOutcome { name: pass, hooks, checks });
    }
    Outcome { kernel, passes }
}

/// The median over the client's connections of its time per exchange, connect
/// excluded: the injected phase plus the rest of the exchange, as the client saw it.
fn client_exchange_ms(lines: &[&str]) -> f64 {
    let mut per_exchange: Vec<f64> = lines
        .iter()
        .filter(|l| l.starts_with("port="))
        .filter_map(|l| {
            let field = |name| client_field(l, name);
            Some((field("elapsed_ms")? - field("connect_ms")?) / field("requests")?.max(1.0))
        })
        .collect();
    per_exchange.sort_by(f64::total_cmp);
    per_exchange.get(per_exchange.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Field `name` of a lab client line (`port=… sent=… received=… requests=…
/// connect_ms=… elapsed_ms=…`).
fn client_field(line: &str, name: &str) -> Option<f64> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// A phase's p50 is right when it is within max(5%, 2 ms) of the injected delay (as on
/// the host), or — when emulation stretches or shortens the lab's own work around the
/// delay — when it is within 15% of the delay and no longer than what the client itself
/// saw per exchange (of which the phase is a part), give or take max(5%, 2 ms).
fn within(p50: f64, delay: f64, seen: f64) -> bool {
    let tolerance = |of: f64| (of * 0.05).max(2.0);
    (p50 - delay).abs() <= tolerance(delay) || ((p50 - delay).abs() <= delay * 0.15 && p50 <= seen + tolerance(seen))
}

/// What the programs read from each socket (addresses, ports) against what the lab
/// client's own sockets say, with the byte counts: every client connection must have a
/// connection line with its port as the remote one, the server's address as the local
/// one, and the bytes it sent and received.
fn socket_reads(lines: &[&str]) -> (String, bool, String) {
    let what = "socket reads: addresses, ports and bytes match the client's sockets".to_owned();
    let server = lines.iter().find_map(|l| l.strip_prefix("server ")).unwrap_or("?");
    let seen: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "connection")
        .collect();
    let mut clients = 0;
    for line in lines.iter().filter(|l| l.starts_with("port=")) {
        clients += 1;
        let field = |name| client_field(line, name).map_or(u64::MAX, |v| v as u64);
        let remote = format!("127.0.0.1:{}", field("port"));
        let Some(c) = seen.iter().find(|c| c["remote"] == remote.as_str()) else {
            return (what, false, format!("no connection from {remote} among {} seen", seen.len()));
        };
        if c["local"] != server || c["bytes_in"] != field("sent") || c["bytes_out"] != field("received") {
            return (what, false, format!("client {line} (server {server}) seen as {c}"));
        }
    }
    let ok = clients > 0;
    (what, ok, format!("{clients} connections checked"))
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    setup::debian_packages(VM_PACKAGES)?;
    let targets = String::from_utf8(Command::new("rustup").args(["target", "list", "--installed"]).output()?.stdout)?;
    if !targets.lines().any(|t| t == MUSL) {
        exec(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    exec(cargo().args([
        "build",
        "--release",
        "--target",
        MUSL,
        "--package",
        "tracer",
        "--package",
        "tracer-tests",
        "--bins",
    ]))?;
    apt_lists()?;
    let initrd = initramfs()?;
    let series: Vec<String> = if opts.kernels.is_empty() {
        KERNELS.iter().map(|(s, _)| s.to_string()).collect()
    } else {
        opts.kernels.clone()
    };
    let mut outcomes = BTreeMap::new();
    for s in &series {
        let vmlinuz = kernel(s)?;
        eprintln!("vm-test: booting {}", vmlinuz.display());
        let start = Instant::now();
        let mut console = boot(&vmlinuz, &initrd, Duration::from_secs(opts.timeout))?;
        // Under emulation a guest kernel now and then dies while booting (an oops in
        // its own start-up, before the test script runs): booted again, at most twice.
        // A guest that reached the script is never booted again, whatever happened.
        for attempt in 2..=3 {
            if console.contains("=== kernel") {
                break;
            }
            let log = vm_dir().join(format!("console-{s}-boot-{}.log", attempt - 1));
            fs::write(&log, &console)?;
            eprintln!(
                "vm-test: Linux {s} died before the tests started (console in {}); booting it again ({attempt} of 3)",
                log.display()
            );
            console = boot(&vmlinuz, &initrd, Duration::from_secs(opts.timeout))?;
        }
        fs::write(vm_dir().join(format!("console-{s}.log")), &console)?;
        eprintln!("vm-test: Linux {s} done in {:.0?}", start.elapsed());
        outcomes.insert(s.clone(), judge(s, &console));
    }
    let mut report = String::new();
    let mut failed = 0;
    for (series, o) in &outcomes {
        let _ = writeln!(report, "Linux {series} ({})", o.kernel);
        for pass in &o.passes {
            let _ = writeln!(report, "  pass {}", pass.name);
            for h in &pass.hooks {
                let _ = writeln!(report, "    hook {h}");
            }
            for (what, ok, detail) in &pass.checks {
                failed += usize::from(!ok);
                let _ = writeln!(report, "    {} {what}: {detail}", if *ok { "PASS" } else { "FAIL" });
            }
        }
    }
    println!("{report}");
    fs::write(vm_dir().join("report.txt"), &report)?;
    if failed > 0 {
        bail!("{failed} checks failed across the kernels (consoles in {})", vm_dir().display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &[&str] = &[
        "server 127.0.0.1:4000",
        "port=40001 sent=100 received=500 requests=5 connect_ms=0.400 elapsed_ms=510.4",
        "port=40002 sent=100 received=500 requests=5 connect_ms=0.400 elapsed_ms=520.4",
        "port=40003 sent=100 received=500 requests=5 connect_ms=0.400 elapsed_ms=530.4",
    ];

    #[test]
    fn the_clients_time_per_exchange_is_the_median() {
        assert!((client_exchange_ms(CLIENT) - 104.0).abs() < 1e-9);
        assert!(client_exchange_ms(&[]).is_nan());
    }

    #[test]
    fn a_phase_is_judged_against_the_delay_or_what_the_client_saw() {
        assert!(within(103.0, 100.0, f64::NAN));
        assert!(within(180.0, 200.0, 186.0), "the client saw the wait shortened too");
        assert!(within(211.0, 200.0, 223.0), "the client saw the exchange stretched");
        assert!(!within(160.0, 200.0, 162.0), "more than 15% from the delay");
        assert!(!within(112.0, 100.0, 101.0), "longer than the client's whole exchange");
    }

    #[test]
    fn the_guest_waits_until_ready_and_says_when_it_is_not() {
        let file = std::env::temp_dir().join(format!("vmtest-ready-{}", std::process::id()));
        let ready = |seconds: u32, pid: u32| {
            let script = format!("{READY}ready {seconds} {} 'tracer: tracing' {pid}", file.display());
            Command::new("sh").arg("-c").arg(script).status().expect("sh").code()
        };
        let alive = std::process::id();
        let mut exited = Command::new("true").spawn().expect("true");
        exited.wait().expect("true");
        fs::write(&file, "tracer: this kernel's hooks: …\ntracer: tracing 1 process(es)\n").unwrap();
        assert_eq!(ready(5, alive), Some(0));
        fs::write(&file, "tracer: this kernel's hooks: …\n").unwrap();
        let start = Instant::now();
        assert_eq!(ready(1, alive), Some(2), "not ready in time");
        assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
        assert_eq!(ready(5, exited.id()), Some(1), "exited before it was ready");
        fs::remove_file(&file).unwrap();
    }

    #[test]
    fn a_scenario_not_ready_in_time_fails_with_the_reason() {
        let console = "=== kernel 6.1.0-50-cloud-amd64\n=== result kprobe slow-reader\n\
                       not ready: the tracer was not tracing within 60 s\nserver 127.0.0.1:4000\n\
                       === stderr kprobe slow-reader\ntracer: this kernel's hooks: accept kretprobe/inet_csk_accept\n\
                       === end kprobe slow-reader\n=== done\n";
        let outcome = judge("6.1", console);
        let kprobe = outcome.passes.iter().find(|p| p.name == "kprobe").expect("kprobe pass");
        let (_, ok, detail) = kprobe.checks.iter().find(|c| c.0.starts_with("slow-reader")).expect("slow-reader");
        assert!(!ok);
        assert_eq!(
            detail,
            "not run: the tracer was not tracing within 60 s; tracer said: tracer: this kernel's hooks: accept kretprobe/inet_csk_accept"
        );
    }

    #[test]
    fn every_scenario_starts_from_fresh_files() {
        let script = init_script();
        let fresh = script.matches("rm -f /tmp/srv.out /tmp/trace.json /tmp/trace.err /tmp/client.out\n").count();
        assert_eq!(fresh, PASSES.len() * SCENARIOS.len());
        assert_eq!(script.matches("2> /tmp/trace.err &").count(), fresh);
    }

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffc1a5f3000)\n\
                   \tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x00007f62850bc000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6284a1e000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f62853a2000)\n";
        assert_eq!(
            ldd_paths(ldd).unwrap(),
            ["/lib/x86_64-linux-gnu/libssl.so.3", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
        );
        let missing = format!("{ldd}\tlibpcre2-8.so.0 => not found\n");
        assert!(ldd_paths(&missing).unwrap_err().to_string().contains("libpcre2-8.so.0 => not found"));
    }
}
