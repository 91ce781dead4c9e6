//! `cargo xtask vm-test`: the tracer on Debian's own kernels, each booted under qemu
//! (software emulation) with an initramfs holding static builds of the tracer and the
//! lab. Inside, `tracer doctor` reports the hooks and phases, then a subset of the
//! accuracy scenarios runs (slow-think, body-stall, slow-accept at 50 ms); the host
//! checks each phase against the injected delay and prints a table per kernel.

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
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Debian's cloud kernels: series and the suite that ships it.
const KERNELS: &[(&str, &str)] = &[("5.10", "bullseye"), ("6.1", "bookworm"), ("6.12", "trixie")];

const VM_PACKAGES: &[(&str, &str)] =
    &[("qemu-system-x86", "/usr/bin/qemu-system-x86_64"), ("busybox-static", "/bin/busybox"), ("cpio", "/usr/bin/cpio")];

const MUSL: &str = "x86_64-unknown-linux-musl";

/// Scenario name, lab server arguments, lab client arguments, phase, delay (ms).
const SCENARIOS: &[(&str, &str, &str, &str, f64)] = &[
    ("slow-think", "--scenario slow-think --delay-ms 50", "--requests 10", "think", 50.0),
    ("body-stall", "--scenario body-stall --delay-ms 50", "--requests 10 --size 10", "send", 50.0),
    // Under emulation the server takes milliseconds between accept() and its next sleep,
    // time the next connection does not wait: a longer delay keeps that within 5%.
    ("slow-accept", "--scenario slow-accept --delay-ms 200", "--connections 10", "accept_wait", 200.0),
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
        .args(["search", "--names-only", &format!("^linux-image-{}\\.[0-9.+a-z-]+-cloud-amd64-unsigned$", series.replace('.', "\\."))])
        .output()?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect();
    names.sort_by_key(|n| n.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u64>().ok()).collect::<Vec<_>>());
    let package = names.pop().with_context(|| format!("no cloud kernel package for Linux {series}"))?;
    let dir = vm_dir().join("kernels").join(&package);
    if !dir.join("boot").exists() {
        eprintln!("vm-test: fetching {package}");
        fs::create_dir_all(&dir)?;
        exec(apt(&["download", &package]).current_dir(&dir).stdout(Stdio::null()))?;
        let deb = fs::read_dir(&dir)?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "deb")).context("no .deb")?;
        exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
        fs::remove_file(deb)?;
    }
    fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .context("no vmlinuz in the kernel package")
}

/// The init script: doctor, then each scenario traced; results between markers on the
/// serial console.
fn init_script() -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\nmkdir -p /tmp\n\
         ip link set lo up\n\
         echo '=== kernel' $(uname -r)\n\
         echo '=== doctor'\ntracer doctor\necho \"=== doctor-exit $?\"\n",
    );
    for (name, server, client, _, _) in SCENARIOS {
        let _ = write!(
            s,
            "lab server {server} > /tmp/srv.out &\nSRV=$!\nsleep 1\nADDR=$(cut -d' ' -f3 /tmp/srv.out)\n\
             tracer --pid $SRV --output json > /tmp/trace.json 2> /tmp/trace.err &\nTP=$!\n\
             for i in $(seq 1 300); do grep -q 'tracer: tracing' /tmp/trace.err && break; sleep 0.2; done\n\
             lab client --server $ADDR {client} > /dev/null\nsleep 1\nkill -INT $TP\nwait $TP\n\
             echo '=== result {name}'\ngrep '\"type\":\"report\"' /tmp/trace.json | tail -1\n\
             echo '=== stderr {name}'\ncat /tmp/trace.err\necho '=== end {name}'\nkill $SRV\nwait $SRV 2>/dev/null\n"
        );
    }
    s.push_str("echo '=== done'\npoweroff -f\n");
    s
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
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
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
    hooks: Vec<String>,
    checks: Vec<(String, bool, String)>,
}

fn judge(series: &str, console: &str) -> Outcome {
    // The first console line may start with the terminal's escape sequences.
    let kernel = console.lines().find_map(|l| l.split_once("=== kernel ").map(|(_, k)| k)).unwrap_or("?").trim().to_owned();
    let hooks = section(console, "=== doctor")
        .unwrap_or_default()
        .into_iter()
        .skip_while(|l| !l.starts_with("hooks:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.trim().to_owned())
        .collect();
    let mut checks = Vec::new();
    if !console.contains("=== done") {
        checks.push((format!("Linux {series} booted and finished"), false, "no '=== done' on the console".to_owned()));
    }
    for (name, _, _, phase, delay) in SCENARIOS {
        let report = section(console, &format!("=== result {name}"))
            .and_then(|lines| lines.into_iter().find(|l| l.starts_with('{')))
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        let what = format!("{name}: {phase} p50 ≈ {delay} ms");
        let Some(report) = report else {
            let stderr = section(console, &format!("=== stderr {name}")).unwrap_or_default().join(" | ");
            checks.push((what, false, format!("no report; tracer said: {stderr}")));
            continue;
        };
        let listener = &report["listeners"][0];
        let value = &listener["phases"][*phase];
        if let Some(why) = value["unavailable"].as_str() {
            checks.push((what, false, format!("unavailable: {why}")));
            continue;
        }
        let p50 = value["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1e6;
        let ok = (p50 - delay).abs() <= (delay * 0.05).max(2.0);
        checks.push((what, ok, format!("{p50:.2} ms over {} samples", value["count"])));
    }
    Outcome { kernel, hooks, checks }
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    setup::debian_packages(VM_PACKAGES)?;
    let targets = String::from_utf8(Command::new("rustup").args(["target", "list", "--installed"]).output()?.stdout)?;
    if !targets.lines().any(|t| t == MUSL) {
        exec(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    exec(cargo().args(["build", "--release", "--target", MUSL, "--package", "tracer", "--package", "tracer-tests", "--bins"]))?;
    apt_lists()?;
    let initrd = initramfs()?;
    let series: Vec<String> =
        if opts.kernels.is_empty() { KERNELS.iter().map(|(s, _)| s.to_string()).collect() } else { opts.kernels.clone() };
    let mut outcomes = BTreeMap::new();
    for s in &series {
        let vmlinuz = kernel(s)?;
        eprintln!("vm-test: booting {}", vmlinuz.display());
        let start = Instant::now();
        let console = boot(&vmlinuz, &initrd, Duration::from_secs(opts.timeout))?;
        fs::write(vm_dir().join(format!("console-{s}.log")), &console)?;
        eprintln!("vm-test: Linux {s} done in {:.0?}", start.elapsed());
        outcomes.insert(s.clone(), judge(s, &console));
    }
    let mut report = String::new();
    let mut failed = 0;
    for (series, o) in &outcomes {
        let _ = writeln!(report, "Linux {series} ({})", o.kernel);
        for h in &o.hooks {
            let _ = writeln!(report, "  hook {h}");
        }
        for (what, ok, detail) in &o.checks {
            failed += usize::from(!ok);
            let _ = writeln!(report, "  {} {what}: {detail}", if *ok { "PASS" } else { "FAIL" });
        }
    }
    println!("{report}");
    fs::write(vm_dir().join("report.txt"), &report)?;
    if failed > 0 {
        bail!("{failed} checks failed across the kernels (consoles in {})", vm_dir().display());
    }
    Ok(())
}
