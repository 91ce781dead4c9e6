//! `tracer doctor`: what this kernel offers the tracer. Loads and attaches every hook as
//! a trace would, then says which implementation each hook uses (or why none works) and
//! which phases are therefore available.
//!
//! Exit status: 0 when every phase is available, 1 when some are not, 2 on error or
//! when tracing is impossible (a hook every phase needs does not attach).

use std::{fs, io::Write as _};

use anyhow::Result;
use tracer_common::ProgramConfig;

use crate::{
    compat::Kind,
    offsets,
    probes::{LoadOptions, Probes},
    timeline::Phase,
    tls,
};

/// Phases beyond the server's six.
const CLIENT_PHASES: [&str; 2] = ["connect", "upstream"];

/// `disabled`: hooks not to attach; `skip_kinds`: kinds of implementation not to use —
/// to see what a kernel without them would give.
pub fn run(disabled: Vec<String>, skip_kinds: Vec<Kind>) -> Result<i32> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let btf = fs::metadata("/sys/kernel/btf/vmlinux");
    let mut out = String::new();
    out += &format!("kernel: Linux {}\n", release.trim());
    out += &match &btf {
        Ok(m) => format!("BTF: /sys/kernel/btf/vmlinux ({:.1} MB)\n", m.len() as f64 / 1e6),
        Err(e) => format!("BTF: missing ({e}); the tracer needs a kernel built with CONFIG_DEBUG_INFO_BTF\n"),
    };
    print(&out);
    let kernel = offsets::from_running_kernel()?;
    let skip_uprobes = skip_kinds.contains(&Kind::UProbe);
    let mut probes = Probes::load(&LoadOptions {
        disabled,
        skip_kinds,
        recvmsg_flags_arg: kernel.recvmsg_flags_arg,
        offsets: kernel.offsets,
        // As a trace would set it: the verifier checks only the code the settings leave
        // reachable.
        config: ProgramConfig {
            filter_by_port: 0,
            drop_reason_listen_overflow: kernel.drop_reason_listen_overflow.unwrap_or(u32::MAX),
            tls_hooks: !skip_uprobes as u32,
            tls_records: tls::cgroup2_root().is_some() as u32,
            // Loaded with labels on where the kernel can read them: the hooks' label
            // paths are verified too.
            labels: kernel.labels_unavailable.is_none() as u32,
            task_btf: kernel.task_btf as u32,
            ..ProgramConfig::default()
        },
        ring_buffer_bytes: 4096,
        max_sockets: 16,
        // Tried on this process's own cgroup.
        cgroups: tls::cgroup_of(std::process::id()).into_iter().collect(),
    })?;
    let mut out = String::from("\nhooks:\n");
    for h in &probes.hooks {
        match &h.implementation {
            Some(chosen) => out += &format!("  {:<20} {chosen}\n", h.hook),
            None => out += &format!("  {:<20} none; lost: {}\n", h.hook, h.needed_for),
        }
        // Why the better implementations were passed over.
        for p in &h.passed_over {
            out += &format!("  {:<20}   not {}: {}\n", "", p.implementation, p.why);
            if let Some(needs) = p.needs {
                out += &format!("  {:<20}     (needs {needs})\n", "");
            }
        }
    }
    out += "\nphases:\n";
    let phases = Phase::ALL.iter().map(|p| p.name()).chain(CLIENT_PHASES);
    for phase in phases {
        match probes.unavailable.get(phase) {
            None => out += &format!("  {phase:<12} available\n"),
            Some(why) => out += &format!("  {phase:<12} unavailable: {why}\n"),
        }
    }
    out += &format!("\nsystem calls: {}\n", syscall_tax(&probes));
    out += &format!("TLS: {}\n", uprobes(&mut probes, skip_uprobes));
    out += &format!("TLS without a library hook: {}\n", record_layer(&mut probes));
    out += &format!("request labels (--labels): {}\n", labels(&probes, kernel.labels_unavailable));
    if let Err(e) = probes.tracing_possible() {
        out += &format!("\ntracing is impossible here: {e:#}\n");
    }
    print(&out);
    Ok(if probes.tracing_possible().is_err() {
        2
    } else if probes.unavailable.is_empty() {
        0
    } else {
        1
    })
}

/// Whether the hooks chosen tax other processes' system calls: while a syscall
/// tracepoint is enabled, every system call on the machine takes the kernel's slower
/// tracing path.
fn syscall_tax(probes: &Probes) -> String {
    let taxing: Vec<&str> = probes
        .hooks
        .iter()
        .filter(|h| h.implementation.as_deref().is_some_and(|i| i.contains("tracepoint/syscalls/")))
        .map(|h| h.hook)
        .collect();
    if taxing.is_empty() && probes.accept_at_peer().is_some() {
        "untaxed while the traced servers ask accept() for the peer's address, as most do (accept is \
         hooked there, in their cgroups only); from the first accept that asks for none, accept is \
         hooked on the syscall tracepoints too, and every system call of every process takes the \
         kernel's tracing path while the tracer runs"
            .into()
    } else if taxing.is_empty() {
        "untaxed: no syscall tracepoint is attached (other processes' system calls pay nothing)".into()
    } else {
        format!(
            "taxed: {} from the syscall tracepoints, so every system call of every process takes \
             the kernel's tracing path while the tracer runs (no hook that only accepts pay for \
             loads here)",
            taxing.join(", ")
        )
    }
}

/// Whether uprobes on the TLS library work here: tried on the first OpenSSL found on
/// the host, for this process only, then removed.
fn uprobes(probes: &mut Probes, skipped: bool) -> String {
    const RECORDS: &str = "TLS connections are followed from their records only";
    if skipped {
        return format!("uprobes skipped (--skip-hook-kind uprobe): {RECORDS}");
    }
    if !std::path::Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        return format!("this kernel has no uprobes (CONFIG_UPROBES): {RECORDS}");
    }
    let Some(lib) = tls::system_library() else {
        return "the kernel offers uprobes; no OpenSSL library (libssl.so) found on this host to try them on".into();
    };
    let pid = std::process::id();
    match probes.hook_tls(&lib, Some(pid)) {
        Ok(()) => {
            probes.unhook_tls(pid);
            format!("uprobes work (tried on {}): OpenSSL's plaintext draws request boundaries", lib.name)
        }
        Err(e) => format!("uprobes do not attach ({e:#}): {RECORDS}"),
    }
}

/// Whether the record-layer program loads here, and where it would attach.
fn record_layer(probes: &mut Probes) -> String {
    let Some(root) = tls::cgroup2_root() else {
        return "no cgroup v2 hierarchy is mounted: TLS handshakes of servers without OpenSSL count as requests".into();
    };
    match probes.load_records() {
        Ok(()) => format!("followed from its records (the program loads; cgroup v2 at {})", root.display()),
        Err(e) => format!("not followed, the record-layer program does not load ({e:#})"),
    }
}

/// Whether `--labels` can read the first bytes of requests here.
fn labels(probes: &Probes, unavailable: Option<&'static str>) -> String {
    if let Some(why) = unavailable {
        return format!("unavailable: {why}; requests are unlabelled");
    }
    if probes.unavailable.contains_key("recv_wait") || probes.unavailable.contains_key("think") {
        return "unavailable: the receive and send hooks are missing".into();
    }
    "available: the programs that read and write requests load with the label paths (buffers found \
     from the task's registers)"
        .into()
}

fn print(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
}
