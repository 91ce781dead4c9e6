//! `cargo xtask vm-test`: the tracer on Debian's own kernels, each booted under qemu
//! (software emulation) with an initramfs holding static builds of the tracer and the
//! lab. Inside, for each way of choosing hooks (the default, then raw tracepoints and
//! trampolines, then kprobes), `tracer doctor` reports the hooks and phases and a subset
//! of the accuracy scenarios runs (slow-think, body-stall, slow-accept, slow-reader,
//! blocked-write); the host checks each phase against the injected delay, and what the
//! programs read from sockets against what the client's own sockets say. Then Debian's
//! nginx serves HTTPS (TLS 1.3 and TLS 1.2) to Debian's curl, both linked with OpenSSL
//! and copied in with their libraries: the tracer must count curl's requests, a `tls`
//! sample per connection curl opened, and follow them with uprobes on OpenSSL (which
//! the doctor must say work). The host prints a table per kernel.
//!
//! arm64 guests too (`--arch aarch64`; in the default matrix): Debian's arm64 6.1 and
//! 6.12 cloud kernels under qemu-system-aarch64 (emulation without KVM, a few times
//! slower than the x86_64 guests), booting the aarch64 release build. Less runs in them:
//! `tracer doctor`, slow-think (with the socket reads and request labels checked) and
//! slow-reader, as the tracer chooses and with kprobes; no HTTPS (nginx and curl would
//! have to be Debian's arm64 builds, with their libraries).

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

use crate::{exec, setup, workspace_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Kernel series to test (repeatable): 5.10, 6.1, 6.12.
    /// Without it, each architecture's own list (x86_64: all three; aarch64: 6.1 and 6.12).
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Guest architecture (repeatable): x86_64, aarch64 (default: both).
    #[arg(long = "arch")]
    pub arches: Vec<String>,
    /// Seconds to let one virtual machine run before giving up.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT)]
    pub timeout: u64,
}

const DEFAULT_TIMEOUT: u64 = 900;

impl Default for Options {
    fn default() -> Self {
        Self { kernels: Vec::new(), arches: Vec::new(), timeout: DEFAULT_TIMEOUT }
    }
}

/// Debian's cloud kernels: series and the suite that ships it.
const KERNELS: &[(&str, &str)] = &[("5.10", "bullseye"), ("6.1", "bookworm"), ("6.12", "trixie")];

const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    // qemu-system-aarch64 (emulation only: this machine has no arm64 KVM).
    ("qemu-system-arm", "/usr/bin/qemu-system-aarch64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
];

use crate::dist::{Target, AARCH64, X86_64};

/// A guest architecture: the release build it runs, Debian's name for it (its kernels
/// are `linux-image-*-cloud-DEBIAN-unsigned`), how qemu boots it, the kernels it boots
/// when none is asked for, and what runs in it.
#[derive(Debug)]
struct Arch {
    target: Target,
    debian: &'static str,
    qemu: &'static str,
    /// qemu's machine and processor.
    machine: &'static [&'static str],
    /// The serial console's device in the guest.
    console: &'static str,
    series: &'static [&'static str],
    passes: &'static [(&'static str, &'static str)],
    /// The names of the scenarios of `SCENARIOS` that run (`None`: all).
    scenarios: Option<&'static [&'static str]>,
    /// Whether the HTTPS scenario runs (Debian's nginx and curl of this machine).
    https: bool,
    /// Whether the tracer reads request labels on this architecture (where it does not,
    /// the doctor must say so and the report hold none).
    labels: bool,
}

const ARCHES: &[Arch] = &[
    Arch {
        target: X86_64,
        debian: "amd64",
        qemu: "qemu-system-x86_64",
        machine: &["-cpu", "max"],
        console: "ttyS0",
        series: &["5.10", "6.1", "6.12"],
        passes: PASSES,
        scenarios: None,
        https: true,
        labels: true,
    },
    // Emulated without KVM, a tracer start takes 10 to 25 s (all five scenarios in the
    // three passes took 8 minutes on 6.12): two ways of choosing hooks (kprobes read
    // their arguments from arm64's registers; on 6.1 arm64 has no BPF trampolines, so
    // the default takes kprobes there too), two scenarios. `pauth-impdef`: pointer
    // authentication with qemu's own cheap hash rather than the architecture's QARMA,
    // which is slow to emulate.
    Arch {
        target: AARCH64,
        debian: "arm64",
        qemu: "qemu-system-aarch64",
        machine: &["-M", "virt", "-cpu", "max,pauth-impdef=on"],
        console: "ttyAMA0",
        series: &["6.1", "6.12"],
        passes: &[PASSES[0], PASSES[2]],
        scenarios: Some(&["slow-think", "slow-reader"]),
        https: false,
        labels: true,
    },
];

impl Arch {
    fn name(&self) -> &'static str {
        self.target.arch
    }

    fn scenarios(&self) -> impl Iterator<Item = &'static Scenario> + '_ {
        SCENARIOS.iter().filter(|sc| self.scenarios.is_none_or(|names| names.contains(&sc.name)))
    }

    /// How a guest of `series` is named in the report and its console's file
    /// (`6.1`, `6.1 aarch64`).
    fn guest(&self, series: &str) -> String {
        if self.target == X86_64 {
            series.to_owned()
        } else {
            format!("{series} {}", self.name())
        }
    }
}

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

/// The HTTPS scenario: Debian's nginx, linked with OpenSSL, serves each protocol
/// version on a port of its own, and Debian's curl (OpenSSL too) makes `TLS_REQUESTS`
/// requests on new connections, then as many on one kept-alive connection, per port.
const TLS_PORTS: &[(u16, &str)] = &[(8443, "TLSv1.3"), (8444, "TLSv1.2")];
const TLS_REQUESTS: u64 = 20;
/// Where the guest finds nginx's configuration, the certificate and its key.
const TLS_DIR: &str = "/etc/tracer-vm";
/// Host programs copied into the initramfs with every library they link, at the same
/// paths (the dynamic loader too).
const HOST_PROGRAMS: &[&str] = &["/usr/sbin/nginx", "/usr/bin/curl"];

/// Ways to run the tracer on each kernel: a name and the options. By default accept
/// comes from the BPF LSM's sock_graft where that LSM is active (6.1, 6.12; not 5.10's
/// default boot) and segments from the cgroup program; the kinds skipped
/// make each hook take its next implementation: raw tracepoints (segments from the raw
/// tcp_probe) and trampolines (accept from inet_csk_accept), then kprobes (send and
/// receive on kernels without their tracepoints; accept from a return probe). The last
/// pass also skips the uprobes: TLS is followed from its records alone there. No pass
/// takes accept from the syscall tracepoints or the peer's address (the host's tests do).
const PASSES: &[(&str, &str)] = &[
    ("default", ""),
    ("raw_tp+fexit", "--skip-hook-kind tp_btf,tracepoint,lsm,cgroup_skb"),
    ("kprobe+records", "--skip-hook-kind fentry,lsm,tracepoint,uprobe"),
];

/// Whether a pass's options leave TLS to the record layer.
fn records_only(options: &str) -> bool {
    options.contains("uprobe")
}

fn vm_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// Where `arch`'s package lists live: target/vm/apt for x86_64 (this machine's own
/// architecture), target/vm/apt-DEBIAN for another.
fn apt_dir(arch: &Arch) -> PathBuf {
    if arch.target == X86_64 {
        vm_dir().join("apt")
    } else {
        vm_dir().join(format!("apt-{}", arch.debian))
    }
}

/// `program` (apt-get or apt-cache) on the suites' own lists of `arch`'s packages. Another
/// architecture's are asked for by apt's own options: the machine's dpkg is left alone
/// (no `dpkg --add-architecture`).
fn apt_with(program: &str, arch: &Arch) -> Command {
    let dir = apt_dir(arch);
    let mut cmd = Command::new(program);
    cmd.arg("-q")
        .arg(format!("-oDir::Etc::sourcelist={}", dir.join("sources.list").display()))
        .arg("-oDir::Etc::sourceparts=/dev/null")
        .arg(format!("-oDir::State::Lists={}", dir.join("lists").display()))
        .arg(format!("-oDir::Cache={}", dir.join("cache").display()));
    if arch.target != X86_64 {
        cmd.arg(format!("-oAPT::Architecture={}", arch.debian)).arg(format!("-oAPT::Architectures::={}", arch.debian));
    }
    cmd
}

fn apt(arch: &Arch, args: &[&str]) -> Command {
    let mut cmd = apt_with("apt-get", arch);
    cmd.args(args);
    cmd
}

/// Package lists of the suites of `arch`'s kernels (x86_64: all three), in a place of
/// their own (the machine's apt configuration is left alone).
fn apt_lists(arch: &Arch, series: &[String]) -> Result<()> {
    let dir = apt_dir(arch);
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let sources: String = KERNELS
        .iter()
        .filter(|(s, _)| arch.target == X86_64 || series.iter().any(|x| x == s))
        .map(|(_, suite)| format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main\n"))
        .collect();
    fs::write(dir.join("sources.list"), sources)?;
    exec(apt(arch, &["update"]).stdout(Stdio::null()))
}

/// Downloads `package` of `arch` into `dir` and unpacks it there (`dpkg -x`).
fn unpack(arch: &Arch, package: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    exec(apt(arch, &["download", package]).current_dir(dir).stdout(Stdio::null()))?;
    let deb = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("no .deb")?;
    exec(Command::new("dpkg").arg("-x").arg(&deb).arg(dir))?;
    Ok(fs::remove_file(deb)?)
}

/// The static busybox of `arch`: this machine's for x86_64, Debian's busybox-static of
/// another architecture fetched and unpacked under target/vm.
fn busybox(arch: &Arch) -> Result<PathBuf> {
    if arch.target == X86_64 {
        return Ok(PathBuf::from("/bin/busybox"));
    }
    let dir = vm_dir().join(format!("busybox-{}", arch.debian));
    let find = || ["bin/busybox", "usr/bin/busybox"].iter().map(|p| dir.join(p)).find(|p| p.exists());
    if let Some(found) = find() {
        return Ok(found);
    }
    let _ = fs::remove_dir_all(&dir);
    unpack(arch, "busybox-static", &dir)?;
    find().with_context(|| format!("no busybox in busybox-static:{}", arch.debian))
}

/// The newest cloud kernel package of `series` for `arch`, unpacked; its vmlinuz.
fn kernel(arch: &Arch, series: &str) -> Result<PathBuf> {
    let out = apt_with("apt-cache", arch)
        .args([
            "search",
            "--names-only",
            &format!("^linux-image-{}\\.[0-9.+a-z-]+-cloud-{}-unsigned$", series.replace('.', "\\."), arch.debian),
        ])
        .output()?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort_by_key(|n| {
        n.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u64>().ok()).collect::<Vec<_>>()
    });
    let package = names.pop().with_context(|| format!("no {} cloud kernel package for Linux {series}", arch.debian))?;
    let dir = vm_dir().join("kernels").join(&package);
    if !dir.join("boot").exists() {
        eprintln!("vm-test: fetching {package}");
        let _ = fs::remove_dir_all(&dir);
        unpack(arch, &package, &dir)?;
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
fn init_script(arch: &Arch) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\nmkdir -p /tmp\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         ip link set lo up\n",
    );
    s.push_str(READY);
    s.push_str("echo '=== kernel' $(uname -r)\n");
    let wait = READY_TIMEOUT;
    for (pass, options) in arch.passes {
        let _ = write!(s, "echo '=== doctor {pass}'\ntracer doctor {options}\necho \"=== doctor-exit {pass} $?\"\n");
        for sc in arch.scenarios() {
            let (name, server, client) = (sc.name, sc.server, sc.client);
            // Labels on where they are checked (see `labels_check`).
            let options = if name == LABELLED { format!("{options} --labels") } else { options.to_string() };
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
        if arch.https {
            s.push_str(&https_scenario(pass, options));
        }
    }
    s.push_str("echo '=== done'\npoweroff -f\n");
    s
}

/// The curl command that fetches `TLS_REQUESTS` URLs from `port` with `version`, on
/// new connections or on one kept-alive connection; it says per transfer
/// `curl PORT STATUS CONNECTIONS-MADE` (curl's own count of the connections it opened).
fn curl_command(port: u16, version: &str, new_connections: bool) -> String {
    let v = version.trim_start_matches("TLSv");
    let mut cmd = format!("/usr/bin/curl -sSk --http1.1 --tlsv{v} --tls-max {v}");
    if new_connections {
        cmd.push_str(" -H 'Connection: close'");
    }
    cmd.push_str(" -w 'curl %{remote_port} %{http_code} %{num_connects}\\n'");
    for _ in 0..TLS_REQUESTS {
        let _ = write!(cmd, " -o /dev/null https://127.0.0.1:{port}/");
    }
    cmd.push_str(" >> /tmp/curl.out 2>> /tmp/curl.err\n");
    cmd
}

/// The HTTPS scenario of a pass: nginx (master and one worker) traced from its master's
/// PID; once the tracer says it is tracing, curl's requests to each port of
/// `TLS_PORTS`. The result section holds curl's lines, nginx's access log (lines
/// `access PORT PROTOCOL CONNECTION STATUS`) and the tracer's final report; then the
/// tracer's stderr, then nginx's error log and curl's errors.
fn https_scenario(pass: &str, options: &str) -> String {
    let wait = READY_TIMEOUT;
    let mut curls = String::new();
    for (port, version) in TLS_PORTS {
        curls.push_str(&curl_command(*port, version, true));
        curls.push_str(&curl_command(*port, version, false));
    }
    format!(
        "rm -rf /tmp/nginx /tmp/trace.json /tmp/trace.err /tmp/curl.out /tmp/curl.err\nmkdir -p /tmp/nginx\nNOT_READY=\n\
         /usr/sbin/nginx -p /tmp/nginx/ -e /tmp/nginx/error.log -c {TLS_DIR}/nginx.conf &\nSRV=$!\n\
         ready {wait} /tmp/nginx/error.log 'start worker process' $SRV\n\
         case $? in 1) NOT_READY='nginx exited before it started its worker';; \
         2) NOT_READY='nginx did not start its worker within {wait} s';; esac\n\
         if [ -z \"$NOT_READY\" ]; then\n\
         tracer {options} --pid $SRV --output json > /tmp/trace.json 2> /tmp/trace.err &\nTP=$!\n\
         ready {wait} /tmp/trace.err 'tracer: tracing' $TP\n\
         case $? in 1) NOT_READY='the tracer exited before it was tracing';; \
         2) NOT_READY='the tracer was not tracing within {wait} s';; esac\n\
         if [ -z \"$NOT_READY\" ]; then\n{curls}sleep 1\nkill -INT $TP\n\
         else kill -KILL $TP 2>/dev/null; fi\nwait $TP\nfi\n\
         echo '=== result {pass} tls'\n[ -n \"$NOT_READY\" ] && echo \"not ready: $NOT_READY\"\n\
         cat /tmp/curl.out 2>/dev/null\nsed 's/^/access /' /tmp/nginx/access.log 2>/dev/null\n\
         grep -s '\"type\":\"report\"' /tmp/trace.json | tail -1\n\
         echo '=== stderr {pass} tls'\ncat /tmp/trace.err 2>/dev/null\n\
         echo '=== nginx {pass} tls'\ncat /tmp/nginx/error.log 2>/dev/null\nsed 's/^/curl: /' /tmp/curl.err 2>/dev/null\n\
         echo '=== end {pass} tls'\nkill $SRV\nwait $SRV 2>/dev/null\n"
    )
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

/// The initramfs of `arch`'s guests: busybox, the static tracer and lab of its release
/// build, the init script (and for HTTPS, nginx, curl and their files).
fn initramfs(arch: &Arch) -> Result<PathBuf> {
    let name = if arch.target == X86_64 { "initramfs".to_owned() } else { format!("initramfs-{}", arch.name()) };
    let root = vm_dir().join(&name);
    let _ = fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::copy(busybox(arch)?, root.join("bin/busybox"))?;
    let bins = arch.target.bins();
    for bin in ["tracer", "lab"] {
        fs::copy(bins.join(bin), root.join("bin").join(bin))?;
    }
    if arch.https {
        copy_host_programs(&root)?;
        tls_files(&root)?;
    }
    fs::write(root.join("init"), init_script(arch))?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;
    let image = vm_dir().join(format!("{name}.cpio"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | cpio -o -H newc --quiet > {}", root.display(), image.display()))
        .status()?;
    if !status.success() {
        bail!("building the initramfs failed");
    }
    Ok(image)
}

/// Boots `kernel` of `arch` with the initramfs; the serial console's output.
fn boot(arch: &Arch, kernel: &Path, initrd: &Path, timeout: Duration) -> Result<String> {
    let mut child = Command::new(arch.qemu)
        // One host thread runs both virtual CPUs: with a thread each, the guest's live
        // code patching (static keys, the int3 protocol used when tracepoints are
        // enabled) raced under emulation and oopsed the guest now and then (seen at
        // boot, and in a tracer's attach at 23 s on 6.12).
        .args(["-accel", "tcg,thread=single"])
        .args(arch.machine)
        .args(["-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console={} panic=-1 quiet", arch.console))
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

fn judge(arch: &Arch, series: &str, console: &str) -> Outcome {
    // The first console line may start with the terminal's escape sequences.
    let kernel =
        console.lines().find_map(|l| l.split_once("=== kernel ").map(|(_, k)| k)).unwrap_or("?").trim().to_owned();
    let mut passes = Vec::new();
    for (pass, options) in arch.passes {
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
        for sc in arch.scenarios() {
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
            if sc.name == LABELLED {
                checks.push(labels_check(arch, &kernel, &doctor, &report, sc));
            }
        }
        checks.push(doctor_syscalls(&doctor));
        if arch.https {
            let records = records_only(options);
            checks.push(doctor_tls(&doctor, records));
            checks.extend(https_checks(console, pass, records));
        }
        passes.push(PassOutcome { name: pass, hooks, checks });
    }
    Outcome { kernel, passes }
}

/// The scenario traced with `--labels`: the lab client's requests (`GET /?size=…`) make
/// one endpoint.
const LABELLED: &str = "slow-think";

/// Whether `kernel` (a release such as `6.1.0-47-cloud-amd64`) is at least `major.minor`.
fn at_least(kernel: &str, major: u32, minor: u32) -> bool {
    let mut parts = kernel.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Labels in the labelled scenario: where the doctor says they can be read (every kernel
/// from 5.15 on must, on an architecture whose labels the tracer reads), the lab's
/// requests make one endpoint `GET /` with every request and its think; where not, the
/// doctor says why and the report has no endpoints.
fn labels_check(
    arch: &Arch,
    kernel: &str,
    doctor: &[&str],
    report: &serde_json::Value,
    sc: &Scenario,
) -> (String, bool, String) {
    let line = doctor.iter().find_map(|l| l.strip_prefix("request labels (--labels): ")).unwrap_or("(no doctor line)");
    let endpoints = report["listeners"][0]["endpoints"].as_array().cloned().unwrap_or_default();
    if !line.starts_with("available") {
        let what = "labels: unavailable, said so, none reported".to_owned();
        let ok = (!arch.labels || !at_least(kernel, 5, 15)) && line.starts_with("unavailable") && endpoints.is_empty();
        return (what, ok, format!("doctor: {line}; {} endpoints", endpoints.len()));
    }
    let what = format!("labels: endpoint GET / with {} requests, think p50 ≈ {} ms", sc.samples, sc.delay_ms);
    let Some(e) = endpoints.iter().find(|e| e["label"] == "GET /") else {
        let labels: Vec<String> = endpoints.iter().map(|e| e["label"].to_string()).collect();
        return (what, false, format!("no endpoint GET / among [{}]", labels.join(", ")));
    };
    let think = &e["phases"]["think"];
    let p50 = think["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1e6;
    let ok = endpoints.len() == 1
        && e["requests"] == sc.samples
        && e["statuses"]["2xx"] == sc.samples
        && think["count"] == sc.samples
        && (p50 - sc.delay_ms).abs() <= sc.delay_ms * 0.15;
    (
        what,
        ok,
        format!(
            "{} endpoint(s); GET /: {} requests, 2xx {}, think p50 {p50:.2} ms over {}",
            endpoints.len(),
            e["requests"],
            e["statuses"]["2xx"],
            think["count"]
        ),
    )
}

/// Every pass takes accept from a hook that only accepts pay for (the BPF LSM, fexit or a
/// return probe): the doctor must say that other processes' system calls are untaxed.
fn doctor_syscalls(doctor: &[&str]) -> (String, bool, String) {
    let what = "doctor: system calls untaxed (no syscall tracepoint)".to_owned();
    match doctor.iter().find_map(|l| l.strip_prefix("system calls: ")) {
        Some(line) => (what, line.starts_with("untaxed"), line.to_owned()),
        None => (what, false, "no \"system calls: \" line in the doctor's output".to_owned()),
    }
}

/// The doctor's TLS line must say that uprobes work.
fn doctor_tls(doctor: &[&str], records: bool) -> (String, bool, String) {
    let (what, prefix, expected) = if records {
        ("doctor: TLS followed from its records", "TLS without a library hook: ", "followed from its records")
    } else {
        ("doctor: uprobes on OpenSSL work", "TLS: ", "uprobes work")
    };
    match doctor.iter().find_map(|l| l.strip_prefix(prefix)) {
        Some(line) => (what.to_owned(), line.starts_with(expected), line.to_owned()),
        None => (what.to_owned(), false, format!("no {prefix:?} line in the doctor's output")),
    }
}

/// The HTTPS scenario of `pass`, a check per port of `TLS_PORTS`: the tracer's
/// requests (each timed) against the responses curl got, its tls samples and TLS connections against
/// the connections curl opened, none aborted, OpenSSL followed with uprobes (from the
/// records alone in a pass that skips them); curl's and
/// nginx's own numbers must be the scenario's.
fn https_checks(console: &str, pass: &str, records: bool) -> Vec<(String, bool, String)> {
    let expected_method = if records { "record layer only" } else { "OpenSSL uprobes" };
    let lines = section(console, &format!("=== result {pass} tls")).unwrap_or_default();
    let stderr = section(console, &format!("=== stderr {pass} tls")).unwrap_or_default();
    // nginx's complaints and curl's errors (nginx's notices say nothing wrong).
    let errors: Vec<&str> = section(console, &format!("=== nginx {pass} tls"))
        .unwrap_or_default()
        .into_iter()
        .filter(|l| {
            l.starts_with("curl: ") || ["[emerg]", "[alert]", "[crit]", "[error]"].iter().any(|e| l.contains(e))
        })
        .collect();
    let report =
        lines.iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| v["type"] == "report");
    let not_ready = lines.iter().find_map(|l| l.strip_prefix("not ready: "));
    let said = || {
        let mut s = if stderr.is_empty() {
            "the tracer said nothing".to_owned()
        } else {
            format!("tracer said: {}", stderr.join(" | "))
        };
        if !errors.is_empty() {
            let _ = write!(s, "; nginx and curl said: {}", errors.join(" | "));
        }
        s
    };
    let (requests, connections) = (2 * TLS_REQUESTS, TLS_REQUESTS + 1);
    let mut checks = Vec::new();
    for (port, version) in TLS_PORTS {
        let what = format!("https {version}: {requests} requests timed, a tls sample per connection ({connections})");
        if let Some(why) = not_ready {
            checks.push((what, false, format!("not run: {why}; {}", said())));
            continue;
        }
        let mut wrong = Vec::new();
        // curl's truth: `curl PORT STATUS CONNECTIONS-MADE` per transfer.
        let transfers: Vec<Vec<&str>> = lines
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() == 4 && f[0] == "curl" && f[1] == port.to_string())
            .collect();
        let answered = transfers.iter().filter(|f| f[2] == "200").count() as u64;
        let opened: u64 = transfers.iter().filter_map(|f| f[3].parse::<u64>().ok()).sum();
        if transfers.len() as u64 != requests || answered != requests {
            wrong.push(format!("curl got {answered} responses 200 of {} transfers, not {requests}", transfers.len()));
        }
        if opened != connections {
            wrong.push(format!("curl opened {opened} connections, not {connections}"));
        }
        // nginx's: `access PORT PROTOCOL CONNECTION STATUS` per request.
        let logged: Vec<Vec<&str>> = lines
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() == 5 && f[0] == "access" && f[1] == port.to_string())
            .collect();
        if logged.len() as u64 != answered {
            wrong.push(format!("nginx logged {} requests, curl got {answered} responses", logged.len()));
        }
        if let Some(f) = logged.iter().find(|f| f[2] != *version) {
            wrong.push(format!("nginx logged a request on {}", f[2]));
        }
        if !records && !stderr.iter().any(|l| l.starts_with("tracer: TLS: OpenSSL uprobes on ")) {
            wrong.push("the tracer did not say it hooked OpenSSL".to_owned());
        }
        let Some(report) = &report else {
            wrong.push(format!("no report; {}", said()));
            checks.push((what, false, wrong.join("; ")));
            continue;
        };
        let Some(l) = report["listeners"].as_array().and_then(|ls| ls.iter().find(|l| l["port"] == *port)) else {
            wrong.push(format!("no listener :{port} in the report"));
            checks.push((what, false, wrong.join("; ")));
            continue;
        };
        let number = |v: &serde_json::Value| v.as_u64().map_or_else(|| format!("{v}"), |n| n.to_string());
        let (seen, aborted, tls) = (&l["requests"], &l["aborted"], &l["phases"]["tls"]);
        let (method, followed) = (&l["tls"]["method"], &l["tls"]["connections"]);
        if seen.as_u64() != Some(answered) {
            wrong.push(format!("the tracer counted {} requests, curl got {answered} responses", number(seen)));
        }
        // Each request timed: its think sample needs the receive and send hooks too.
        let think = &l["phases"]["think"];
        if let Some(why) = think["unavailable"].as_str() {
            wrong.push(format!("think unavailable: {why}"));
        } else if think["count"].as_u64() != Some(answered) {
            wrong.push(format!("{} think samples for {answered} requests", number(&think["count"])));
        }
        if aborted.as_u64() != Some(0) {
            wrong.push(format!("{} aborted", number(aborted)));
        }
        if let Some(why) = tls["unavailable"].as_str() {
            wrong.push(format!("tls unavailable: {why}"));
        } else if tls["count"].as_u64() != Some(opened) {
            wrong.push(format!("{} tls samples for the {opened} connections curl opened", number(&tls["count"])));
        }
        if followed.as_u64() != Some(opened) {
            wrong.push(format!("{} TLS connections for the {opened} curl opened", number(followed)));
        }
        if method != expected_method {
            wrong.push(format!("TLS followed by {method}, not {expected_method}"));
        }
        if report["lost_events"].as_u64() != Some(0) {
            wrong.push(format!("{} events lost", number(&report["lost_events"])));
        }
        let timed = think["count"].as_u64().map_or_else(|| "none".to_owned(), |n| n.to_string());
        let numbers = format!(
            "{} requests (curl: {answered} responses 200 on {opened} connections; nginx logged {}), {} timed, \
             {} aborted, tls {} samples (p50 {:.2} ms), {} TLS connections by {}",
            number(seen),
            logged.len(),
            timed,
            number(aborted),
            number(&tls["count"]),
            tls["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1e6,
            number(followed),
            method.as_str().unwrap_or("?"),
        );
        let ok = wrong.is_empty();
        let detail = if ok { numbers } else { format!("{} — {numbers}", wrong.join("; ")) };
        checks.push((what, ok, detail));
    }
    checks
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

/// The architectures of `names` (all of `ARCHES` when empty).
fn selected(names: &[String]) -> Result<Vec<&'static Arch>> {
    if names.is_empty() {
        return Ok(ARCHES.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            ARCHES.iter().find(|a| a.name() == n.as_str() || a.debian == n.as_str()).with_context(|| {
                let known: Vec<&str> = ARCHES.iter().map(Arch::name).collect();
                format!("no guest architecture {n:?} (known: {})", known.join(", "))
            })
        })
        .collect()
}

/// Boots `arch`'s kernel of `series` with `initrd` (again, at most twice, when it dies
/// before the tests start) and judges what its console says.
fn run_guest(arch: &Arch, series: &str, guest: &str, initrd: &Path, opts: &Options) -> Result<Outcome> {
    let vmlinuz = kernel(arch, series)?;
    let file = guest.replace(' ', "-");
    eprintln!("vm-test: booting {}", vmlinuz.display());
    let start = Instant::now();
    let mut console = boot(arch, &vmlinuz, initrd, Duration::from_secs(opts.timeout))?;
    // Under emulation a guest kernel now and then dies while booting (an oops in its
    // own start-up, before the test script runs): booted again, at most twice. A guest
    // that reached the script is never booted again, whatever happened.
    for attempt in 2..=3 {
        if console.contains("=== kernel") {
            break;
        }
        let log = vm_dir().join(format!("console-{file}-boot-{}.log", attempt - 1));
        fs::write(&log, &console)?;
        eprintln!(
            "vm-test: Linux {guest} died before the tests started (console in {}); booting it again ({attempt} of 3)",
            log.display()
        );
        console = boot(arch, &vmlinuz, initrd, Duration::from_secs(opts.timeout))?;
    }
    fs::write(vm_dir().join(format!("console-{file}.log")), &console)?;
    eprintln!("vm-test: Linux {guest} done in {:.0?}", start.elapsed());
    Ok(judge(arch, guest, &console))
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    setup::debian_packages(VM_PACKAGES)?;
    let arches = selected(&opts.arches)?;
    let mut outcomes = BTreeMap::new();
    for arch in arches {
        crate::dist::build_static(arch.target, crate::dist::STATIC_PACKAGES)?;
        let series: Vec<String> = if opts.kernels.is_empty() {
            arch.series.iter().map(|s| s.to_string()).collect()
        } else {
            opts.kernels.clone()
        };
        apt_lists(arch, &series)?;
        let initrd = initramfs(arch)?;
        for s in &series {
            let guest = arch.guest(s);
            let outcome = run_guest(arch, s, &guest, &initrd, opts)?;
            outcomes.insert(guest, outcome);
        }
    }
    // Under emulation a guest kernel now and then dies while booting (an oops in
    // its own start-up, before the test script runs): booted again, at most twice.
    // A guest that reached the script is never booted again, whatever happened.
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
    fn labels_are_required_from_5_15_and_said_unavailable_before() {
        assert!(at_least("6.1.0-50-cloud-amd64", 5, 15) && at_least("5.15.0", 5, 15));
        assert!(!at_least("5.10.0-32-cloud-amd64", 5, 15));
        let sc = SCENARIOS.iter().find(|s| s.name == LABELLED).expect("labelled scenario");
        let x86 = &ARCHES[0];
        let endpoint = |requests: u64, p50_ms: f64| {
            serde_json::json!({"listeners": [{"endpoints": [{"label": "GET /", "requests": requests,
                "statuses": {"2xx": requests}, "phases": {"think": {"count": requests, "p50_ns": p50_ms * 1e6}}}]}]})
        };
        let available = ["request labels (--labels): available: yes"];
        assert!(labels_check(x86, "6.1.0", &available, &endpoint(sc.samples, sc.delay_ms), sc).1);
        assert!(!labels_check(x86, "6.1.0", &available, &endpoint(sc.samples - 1, sc.delay_ms), sc).1);
        assert!(!labels_check(x86, "6.1.0", &available, &endpoint(sc.samples, 2.0 * sc.delay_ms), sc).1);
        let unavailable = ["request labels (--labels): unavailable: no helper"];
        let none = serde_json::json!({"listeners": [{}]});
        assert!(labels_check(x86, "5.10.0", &unavailable, &none, sc).1);
        assert!(!labels_check(x86, "6.1.0", &unavailable, &none, sc).1, "5.15 and later must label");
    }

    #[test]
    fn the_arm64_guest_runs_its_subset_and_must_label() {
        let arm = &ARCHES[1];
        assert_eq!((arm.name(), arm.guest("6.1")), ("aarch64", "6.1 aarch64".to_owned()));
        let script = init_script(arm);
        assert!(!script.contains("nginx") && !script.contains("curl"), "no HTTPS in the arm64 guest");
        assert_eq!(script.matches("=== result ").count(), arm.passes.len() * 2);
        assert_eq!(script.matches("tracer doctor").count(), arm.passes.len());
        // Labels are read from arm64's registers: from 5.15 on they must be available.
        let sc = SCENARIOS.iter().find(|s| s.name == LABELLED).expect("labelled scenario");
        let unavailable =
            ["request labels (--labels): unavailable: request labels are read on x86_64 and aarch64 only"];
        let none = serde_json::json!({"listeners": [{}]});
        assert!(!labels_check(arm, "6.1.0-50-cloud-arm64", &unavailable, &none, sc).1);
        // A run that never reached the tests fails on the subset alone, HTTPS not asked.
        let outcome = judge(arm, "6.1 aarch64", "=== kernel 6.1.0-50-cloud-arm64\n");
        assert_eq!(outcome.passes.len(), arm.passes.len());
        for pass in &outcome.passes {
            let names: Vec<&str> = pass.checks.iter().map(|c| c.0.split(':').next().unwrap_or("")).collect();
            let expected = ["Linux 6.1 aarch64 booted and finished", "slow-think", "slow-reader", "doctor"];
            assert_eq!(names, expected, "{:?}", pass.checks);
        }
    }

    #[test]
    fn guest_architectures_are_named_as_rust_or_debian_names_them() {
        assert_eq!(selected(&[]).unwrap().len(), ARCHES.len());
        let arm = selected(&["arm64".to_owned(), "aarch64".to_owned()]).unwrap();
        assert!(arm.iter().all(|a| a.target == AARCH64));
        assert!(selected(&["riscv64".to_owned()]).unwrap_err().to_string().contains("known: x86_64, aarch64"));
    }

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
        let console = "=== kernel 6.1.0-50-cloud-amd64\n=== result kprobe+records slow-reader\n\
                       not ready: the tracer was not tracing within 60 s\nserver 127.0.0.1:4000\n\
                       === stderr kprobe+records slow-reader\ntracer: this kernel's hooks: accept kretprobe/inet_csk_accept\n\
                       === end kprobe+records slow-reader\n=== done\n";
        let outcome = judge(&ARCHES[0], "6.1", console);
        let kprobe = outcome.passes.iter().find(|p| p.name == "kprobe+records").expect("kprobe+records pass");
        let (_, ok, detail) = kprobe.checks.iter().find(|c| c.0.starts_with("slow-reader")).expect("slow-reader");
        assert!(!ok);
        assert_eq!(
            detail,
            "not run: the tracer was not tracing within 60 s; tracer said: tracer: this kernel's hooks: accept kretprobe/inet_csk_accept"
        );
    }

    #[test]
    fn every_scenario_starts_from_fresh_files() {
        let script = init_script(&ARCHES[0]);
        let fresh = script.matches("rm -f /tmp/srv.out /tmp/trace.json /tmp/trace.err /tmp/client.out\n").count();
        assert_eq!(fresh, PASSES.len() * SCENARIOS.len());
        let https =
            script.matches("rm -rf /tmp/nginx /tmp/trace.json /tmp/trace.err /tmp/curl.out /tmp/curl.err\n").count();
        assert_eq!(https, PASSES.len());
        assert_eq!(script.matches("2> /tmp/trace.err &").count(), fresh + https);
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

    #[test]
    fn curl_fetches_every_url_to_nowhere_on_new_connections_or_one() {
        let fresh = curl_command(8443, "TLSv1.3", true);
        assert!(fresh.starts_with("/usr/bin/curl -sSk --http1.1 --tlsv1.3 --tls-max 1.3 -H 'Connection: close' "));
        assert_eq!(fresh.matches(" -o /dev/null https://127.0.0.1:8443/").count() as u64, TLS_REQUESTS);
        assert_eq!(fresh.matches("https://").count() as u64, TLS_REQUESTS);
        let reused = curl_command(8444, "TLSv1.2", false);
        assert!(reused.contains("--tlsv1.2 --tls-max 1.2") && !reused.contains("Connection: close"));
        let conf = nginx_conf();
        for (port, version) in TLS_PORTS {
            assert!(conf.contains(&format!("listen 127.0.0.1:{port} ssl;\nssl_protocols {version};")), "{conf}");
        }
    }

    /// A console whose default pass ran the HTTPS scenario: curl's and nginx's lines as
    /// the scenario means them, and a report with `requests` and `tls` samples per
    /// listener, TLS followed by `method`.
    fn https_console(requests: u64, tls: u64, method: &str) -> String {
        let mut c = String::from(
            "=== kernel 6.12.117+deb13-cloud-amd64\n=== doctor default\nhooks:\n  accept  tp_btf/x\n\n\
             TLS: uprobes work (tried on /lib/x86_64-linux-gnu/libssl.so.3): OpenSSL's plaintext draws request boundaries\n\
             === doctor-exit default 0\n=== result default tls\n",
        );
        let mut listeners = Vec::new();
        let mut connection = 0;
        for (port, version) in TLS_PORTS {
            for fresh in [true, false] {
                for i in 0..TLS_REQUESTS {
                    let opened = u64::from(fresh || i == 0);
                    connection += opened;
                    let _ = writeln!(c, "curl {port} 200 {opened}");
                    let _ = writeln!(c, "access {port} {version} {connection} 200");
                }
            }
            listeners.push(serde_json::json!({
                "port": port, "requests": requests, "aborted": 0,
                "phases": {"tls": {"count": tls, "p50_ns": 4_500_000}, "think": {"count": requests}},
                "tls": {"method": method, "connections": tls},
            }));
        }
        let report = serde_json::json!({"type": "report", "kind": "final", "lost_events": 0, "listeners": listeners});
        let _ = write!(
            c,
            "{report}\n=== stderr default tls\ntracer: TLS: OpenSSL uprobes on /lib/x86_64-linux-gnu/libssl.so.3\n\
             tracer: tracing 2 process(es) from PID(s) [80]; Ctrl-C to stop\n=== nginx default tls\n\
             2026/11/30 22:51:11 [notice] 80#80: start worker process 81\n=== end default tls\n=== done\n"
        );
        c
    }

    fn default_checks(console: &str) -> Vec<(String, bool, String)> {
        let outcome = judge(&ARCHES[0], "6.12", console);
        let pass = outcome.passes.into_iter().find(|p| p.name == "default").expect("default pass");
        pass.checks
            .into_iter()
            .filter(|c| c.0.starts_with("https") || (c.0.starts_with("doctor") && !c.0.contains("system calls")))
            .collect()
    }

    #[test]
    fn a_pass_with_a_syscall_tracepoint_fails_the_doctor_check() {
        let untaxed = ["system calls: untaxed: no syscall tracepoint is attached (…)"];
        assert!(doctor_syscalls(&untaxed).1);
        let taxed = ["hooks:", "system calls: taxed: accept from the syscall tracepoints, so (…)"];
        let (_, ok, detail) = doctor_syscalls(&taxed);
        assert!(!ok && detail.starts_with("taxed: accept"), "{detail}");
        assert!(!doctor_syscalls(&["hooks:"]).1);
    }

    #[test]
    fn https_passes_when_the_tracer_agrees_with_curl() {
        let checks = default_checks(&https_console(2 * TLS_REQUESTS, TLS_REQUESTS + 1, "OpenSSL uprobes"));
        assert_eq!(checks.len(), 1 + TLS_PORTS.len());
        assert!(checks.iter().all(|c| c.1), "{checks:#?}");
        assert_eq!(
            checks[1].2,
            "40 requests (curl: 40 responses 200 on 21 connections; nginx logged 40), 40 timed, 0 aborted, \
             tls 21 samples (p50 4.50 ms), 21 TLS connections by OpenSSL uprobes"
        );
    }

    #[test]
    fn https_fails_saying_which_count_is_wrong() {
        let checks = default_checks(&https_console(38, 20, "record layer only"));
        let https: Vec<_> = checks.iter().filter(|c| c.0.starts_with("https")).collect();
        assert_eq!(https.len(), TLS_PORTS.len());
        for (_, ok, detail) in https {
            assert!(!ok);
            assert!(
                detail.starts_with(
                    "the tracer counted 38 requests, curl got 40 responses; \
                     38 think samples for 40 requests; \
                     20 tls samples for the 21 connections curl opened; \
                     20 TLS connections for the 21 curl opened; \
                     TLS followed by \"record layer only\", not OpenSSL uprobes — 38 requests"
                ),
                "{detail}"
            );
        }
        // Requests counted but not timed (the receive hook did not load).
        let untimed = https_console(40, 21, "OpenSSL uprobes")
            .replace(r#""think":{"count":40}"#, r#""think":{"unavailable":"the receive hook is unavailable (…)"}"#);
        let (_, ok, detail) = &default_checks(&untimed)[1];
        assert!(!ok);
        assert!(detail.starts_with("think unavailable: the receive hook is unavailable (…) — 40 requests"), "{detail}");
        // curl's own numbers are checked too: a transfer that failed is not a request.
        let console = https_console(39, 21, "OpenSSL uprobes").replacen("curl 8443 200 1", "curl 8443 000 0", 1);
        let (_, ok, detail) = &default_checks(&console)[1];
        assert!(!ok);
        assert!(detail.starts_with("curl got 39 responses 200 of 40 transfers, not 40; curl opened 20 connections, not 21; nginx logged 40 requests, curl got 39 responses"), "{detail}");
    }

    #[test]
    fn https_not_run_or_without_uprobes_fails_with_the_reason() {
        let console = "=== kernel 6.1.0-50-cloud-amd64\n=== doctor default\n\
                       TLS: uprobes do not attach (perf_event_open failed): TLS connections are followed from their records only\n\
                       === doctor-exit default 1\n=== result default tls\n\
                       not ready: nginx exited before it started its worker\n=== stderr default tls\n\
                       === nginx default tls\n2026/11/30 [emerg] 80#80: open() \"/tmp/nginx/x\" failed\n\
                       === end default tls\n=== done\n";
        let checks = default_checks(console);
        assert!(!checks[0].1);
        assert_eq!(
            checks[0].2,
            "uprobes do not attach (perf_event_open failed): TLS connections are followed from their records only"
        );
        assert!(!checks[1].1);
        assert_eq!(
            checks[1].2,
            "not run: nginx exited before it started its worker; the tracer said nothing; \
             nginx and curl said: 2026/11/30 [emerg] 80#80: open() \"/tmp/nginx/x\" failed"
        );
        let silent =
            https_console(40, 21, "OpenSSL uprobes").replace("tracer: TLS: OpenSSL uprobes on", "tracer: TLS?");
        let checks = default_checks(&silent.replace("TLS: uprobes work", "uprobes work"));
        assert_eq!(checks[0].2, "no \"TLS: \" line in the doctor's output");
        assert!(checks[1].2.starts_with("the tracer did not say it hooked OpenSSL — "), "{}", checks[1].2);
    }

    #[test]
    fn socket_reads_must_match_every_client_connection() {
        let line = |port: u32| {
            format!(
                r#"{{"type":"connection","local":"127.0.0.1:4000","remote":"127.0.0.1:{port}","bytes_in":100,"bytes_out":500}}"#
            )
        };
        let (a, b, c) = (line(40001), line(40002), line(40003));
        let mut all: Vec<&str> = CLIENT.to_vec();
        all.extend([a.as_str(), b.as_str(), c.as_str()]);
        assert!(socket_reads(&all).1, "{:?}", socket_reads(&all));
        let missing: Vec<&str> = all.iter().copied().filter(|l| !l.contains("40003\"")).collect();
        assert!(!socket_reads(&missing).1);
        let wrong = all.join("\n").replace(r#""bytes_in":100,"bytes_out":500}"#, r#""bytes_in":99,"bytes_out":500}"#);
        assert!(!socket_reads(&wrong.lines().collect::<Vec<_>>()).1);
    }
}
