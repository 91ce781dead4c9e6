//! Loading and attaching the kernel programs.
//!
//! The table below lists every hook the tracer uses, with the program that implements it
//! on this kernel family; the loader attaches each, says which it chose, and names the
//! phases lost when a hook cannot attach instead of failing silently.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, FExit, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use log::{debug, info, warn};
use tracer_common::{
    counter, dir, flags, kind, origin, EventHeader, KernelOffsets, ProgramConfig, Request, SockState, TupleKey,
};

/// How a hook is implemented.
#[derive(Debug, Clone, Copy)]
enum Attach {
    /// BTF-typed tracepoint (`tp_btf`): the kernel function's own arguments.
    TpBtf(&'static str),
    /// Classic tracepoint under tracefs: category and name.
    TracePoint(&'static str, &'static str),
    /// BPF trampoline on a kernel function's return (its arguments and return value).
    FExit(&'static str),
    /// BPF trampoline on a kernel function's entry.
    FEntry(&'static str),
}

impl Attach {
    fn describe(self) -> String {
        match self {
            Attach::TpBtf(name) => format!("tp_btf/{name}"),
            Attach::TracePoint(category, name) => format!("tracepoint/{category}/{name}"),
            Attach::FExit(name) => format!("fexit/{name}"),
            Attach::FEntry(name) => format!("fentry/{name}"),
        }
    }
}

struct Hook {
    /// Logical hook name, for messages.
    hook: &'static str,
    program: &'static str,
    attach: Attach,
    /// What is lost without it.
    needed_for: &'static str,
    /// Phases that cannot be measured without it.
    phases: &'static [&'static str],
    /// Other implementations, tried in order when the first does not load or attach
    /// (program name, attachment).
    fallbacks: &'static [(&'static str, Attach)],
}

const HOOKS: &[Hook] = &[
    Hook { hook: "state changes", program: "inet_sock_set_state", attach: Attach::TpBtf("inet_sock_set_state"), needed_for: "every phase", phases: &[], fallbacks: &[] },
    Hook { hook: "accept", program: "sys_exit_accept4", attach: Attach::TracePoint("syscalls", "sys_exit_accept4"), needed_for: "every phase", phases: &[], fallbacks: &[] },
    Hook { hook: "accept (old syscall)", program: "sys_exit_accept", attach: Attach::TracePoint("syscalls", "sys_exit_accept"), needed_for: "servers calling accept() instead of accept4()", phases: &[], fallbacks: &[] },
    Hook { hook: "receive", program: "sock_recv_length", attach: Attach::TpBtf("sock_recv_length"), needed_for: "recv_wait, think, bytes in, and the request boundaries send and delivery need", phases: &["recv_wait", "think", "send", "delivery", "upstream"], fallbacks: &[("tcp_recvmsg_exit_nonblock", Attach::FExit("tcp_recvmsg")), ("tcp_recvmsg_exit", Attach::FExit("tcp_recvmsg"))] },
    Hook { hook: "send", program: "sock_send_length", attach: Attach::TpBtf("sock_send_length"), needed_for: "think, send, delivery, bytes out", phases: &["think", "send", "delivery", "upstream"], fallbacks: &[("tcp_sendmsg_exit", Attach::FExit("tcp_sendmsg"))] },
    Hook { hook: "data arrival", program: "sk_data_ready", attach: Attach::TpBtf("sk_data_ready"), needed_for: "recv_wait", phases: &["recv_wait", "upstream"], fallbacks: &[("sock_def_readable", Attach::FEntry("sock_def_readable"))] },
    Hook { hook: "acknowledgements", program: "tcp_probe", attach: Attach::TpBtf("tcp_probe"), needed_for: "delivery", phases: &["delivery"], fallbacks: &[] },
    Hook { hook: "SYN-ACK retransmits", program: "tcp_retransmit_synack", attach: Attach::TpBtf("tcp_retransmit_synack"), needed_for: "handshake with retransmits", phases: &[], fallbacks: &[] },
    Hook { hook: "retransmits", program: "tcp_retransmit_skb", attach: Attach::TpBtf("tcp_retransmit_skb"), needed_for: "SYN retransmits of connects", phases: &[], fallbacks: &[] },
    Hook { hook: "listen overflows", program: "kfree_skb", attach: Attach::TpBtf("kfree_skb"), needed_for: "exact listen drops (handshake ACKs dropped on a full accept queue would count twice)", phases: &[], fallbacks: &[] },
    Hook { hook: "resets sent", program: "tcp_send_reset", attach: Attach::TpBtf("tcp_send_reset"), needed_for: "resets sent", phases: &[], fallbacks: &[] },
    Hook { hook: "resets received", program: "tcp_receive_reset", attach: Attach::TpBtf("tcp_receive_reset"), needed_for: "resets received", phases: &[], fallbacks: &[] },
    Hook { hook: "process fork", program: "sched_process_fork", attach: Attach::TpBtf("sched_process_fork"), needed_for: "children forked after start", phases: &[], fallbacks: &[] },
    Hook { hook: "process exit", program: "sched_process_exit", attach: Attach::TpBtf("sched_process_exit"), needed_for: "noticing that traced processes exited", phases: &[], fallbacks: &[] },
];

static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

pub struct LoadOptions {
    /// Hooks not to attach (by program name), to run as on a kernel without them.
    pub disabled: Vec<String>,
    pub offsets: KernelOffsets,
    pub config: ProgramConfig,
    pub ring_buffer_bytes: u32,
    pub max_sockets: u32,
}

pub struct Probes {
    ebpf: Ebpf,
    /// Phases this kernel cannot measure, with the reason.
    pub unavailable: BTreeMap<&'static str, String>,
    /// Every hook: its implementation and whether it attached (the error if not).
    pub hooks: Vec<HookStatus>,
}

/// How one hook fared on this kernel (for `tracer doctor`).
pub struct HookStatus {
    pub hook: &'static str,
    pub implementation: String,
    pub needed_for: &'static str,
    pub error: Option<String>,
}

/// Classic tracepoints need tracefs; a fresh machine may not have it mounted.
fn ensure_tracefs() -> Result<()> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(());
        }
    }
    info!("mounting tracefs at /sys/kernel/tracing");
    let target = c"/sys/kernel/tracing";
    let rc = unsafe { libc::mount(c"nodev".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {err}; mount it with `mount -t tracefs nodev /sys/kernel/tracing`");
    }
    Ok(())
}

fn permission_hint(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if s.contains("Operation not permitted") || s.contains("Permission denied") {
            return true;
        }
        cur = e.source();
    }
    false
}

impl Probes {
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        // Wake the reader at once when a quarter of the ring buffer is waiting.
        let config = ProgramConfig { wakeup_bytes: opts.ring_buffer_bytes / 4, ..opts.config };
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux); the tracer needs a kernel built with CONFIG_DEBUG_INFO_BTF")?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("OFFSETS", &opts.offsets, true)
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", opts.ring_buffer_bytes)
            .map_max_entries("SOCKS", opts.max_sockets)
            .load(PROGRAMS)
            .map_err(|e| {
                let hint = permission_hint(&e);
                let err = anyhow::Error::new(e).context("loading the kernel programs");
                if hint {
                    err.context("not permitted: run as root, or grant CAP_BPF and CAP_PERFMON (e.g. `sudo setcap cap_bpf,cap_perfmon+ep tracer`)")
                } else {
                    err
                }
            })?;
        ensure_tracefs()?;
        let mut unavailable = BTreeMap::new();
        let mut hooks = Vec::new();
        for hook in HOOKS {
            let mut chosen = hook.attach;
            let mut result = if hook.program == "kfree_skb" && opts.config.drop_reason_listen_overflow == u32::MAX {
                warn!("this kernel has no listen-overflow drop reason: handshake ACKs dropped on a full accept queue count twice in listen_drops");
                Err(anyhow::anyhow!("the kernel has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"))
            } else if opts.disabled.iter().any(|d| d == hook.program) {
                Err(anyhow::anyhow!("disabled with --disable-hook"))
            } else {
                attach(&mut ebpf, hook.program, hook.attach, &btf)
            };
            // The first implementation that this kernel accepts. (For tcp_recvmsg, the
            // variant with the older, longer argument list comes first: the verifier
            // rejects it where the function has fewer arguments.)
            for &(program, how) in hook.fallbacks {
                if result.is_ok() {
                    break;
                }
                if opts.disabled.iter().any(|d| d == program) {
                    continue;
                }
                match attach(&mut ebpf, program, how, &btf) {
                    Ok(()) => {
                        chosen = how;
                        result = Ok(());
                    }
                    Err(e) => {
                        debug!("{}: {} unavailable: {e:#}", hook.hook, how.describe());
                        // Say why each implementation failed (first line: verifier logs are long).
                        let first = format!("{e:#}").lines().next().unwrap_or("").chars().take(200).collect::<String>();
                        result = result.map_err(|prev| prev.context(format!("{} failed too: {first}", how.describe())));
                    }
                }
            }
            hooks.push(HookStatus {
                hook: hook.hook,
                implementation: chosen.describe(),
                needed_for: hook.needed_for,
                error: result.as_ref().err().map(|e| format!("{e:#}")),
            });
            match result {
                Ok(()) => debug!("{}: {}", hook.hook, chosen.describe()),
                Err(e) if hook.needed_for == "every phase" => {
                    return Err(e.context(format!("attaching the {} hook ({:?})", hook.hook, hook.attach)));
                }
                Err(e) => {
                    warn!("{} hook unavailable ({:?}: {e:#}): no {}", hook.hook, hook.attach, hook.needed_for);
                    for phase in hook.phases {
                        unavailable
                            .entry(*phase)
                            .or_insert_with(|| format!("the {} hook ({}) is unavailable: {e:#}", hook.hook, hook.program));
                    }
                }
            }
        }
        Ok(Self { ebpf, unavailable, hooks })
    }

    pub fn add_pid(&mut self, tgid: u32) -> Result<()> {
        let mut pids: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("PIDS").context("PIDS map missing")?)?;
        pids.insert(tgid, 1, 0).with_context(|| format!("adding PID {tgid} to the traced set"))
    }

    /// An upstream connection the traced process had open before tracing started.
    pub fn add_existing_upstream(&mut self, key: TupleKey) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, TupleKey, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("EXISTING_CLIENTS").context("EXISTING_CLIENTS map missing")?)?;
        map.insert(key, 1, 0).context("registering an open upstream connection")
    }

    pub fn add_port(&mut self, port: u16) -> Result<()> {
        let mut ports: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("PORTS").context("PORTS map missing")?)?;
        ports.insert(port as u32, 1, 0).with_context(|| format!("adding port {port}"))
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Sum over CPUs of one of the kernel-side counters.
    pub fn counter(&self, index: u32) -> Result<u64> {
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map missing")?)?;
        Ok(counters.get(&index, 0)?.iter().sum())
    }

    /// Handshake ACKs the listener with socket `cookie` dropped on a full accept queue.
    pub fn ack_overflows(&self, cookie: u64) -> u64 {
        let Some(map) = self.ebpf.map("ACK_OVERFLOWS") else { return 0 };
        let Ok(map) = BpfHashMap::<&MapData, u64, u64>::try_from(map) else { return 0 };
        map.get(&cookie, 0).unwrap_or(0)
    }

    /// Exchanges whose response was written but which the programs have not emitted yet,
    /// because they emit an exchange when its connection's next request starts. Read at
    /// the end of tracing, so that the last request of every open connection counts.
    pub fn in_flight_exchanges(&self) -> Vec<Request> {
        let Some(map) = self.ebpf.map("SOCKS") else { return Vec::new() };
        let Ok(socks) = BpfHashMap::<&MapData, u64, SockState>::try_from(map) else { return Vec::new() };
        socks
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, st)| {
                !origin::is_client(st.origin) && st.owner != 0 && st.dir == dir::WRITING && st.first_write_ns != 0
            })
            .map(|(sk, st)| Request {
                header: EventHeader { kind: kind::REQUEST, tgid: st.owner, tid: st.tid, sock: sk, ..Default::default() },
                arrival_ns: st.arrival_ns,
                first_read_ns: st.first_read_ns,
                last_read_ns: st.last_read_ns,
                first_write_ns: st.first_write_ns,
                last_write_ns: st.last_write_ns,
                acked_ns: st.acked_ns,
                bytes_in: st.req_in,
                bytes_out: st.req_out,
                index: st.requests,
                // Not acknowledged yet: its delivery is still going on, so it has none.
                flags: st.req_flags | if st.acked_ns == 0 { flags::UNDELIVERED } else { 0 },
                tid: st.tid,
                _pad: 0,
            })
            .collect()
    }

    /// Entries in the per-socket state map.
    pub fn tracked_sockets(&self) -> u64 {
        let Some(map) = self.ebpf.map("SOCKS") else { return 0 };
        let Ok(socks) = BpfHashMap::<&MapData, u64, SockState>::try_from(map) else { return 0 };
        socks.keys().filter(Result::is_ok).count() as u64
    }

    pub fn lost_events(&self) -> u64 {
        self.counter(counter::LOST_EVENTS).unwrap_or(0)
    }
}

fn attach(ebpf: &mut Ebpf, name: &str, how: Attach, btf: &Btf) -> Result<()> {
    let program = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the object"))?;
    match how {
        Attach::TpBtf(name) => {
            let p: &mut BtfTracePoint = program.try_into()?;
            p.load(name, btf)?;
            p.attach()?;
        }
        Attach::TracePoint(category, name) => {
            let p: &mut TracePoint = program.try_into()?;
            p.load()?;
            p.attach(category, name)?;
        }
        Attach::FExit(function) => {
            let p: &mut FExit = program.try_into()?;
            p.load(function, btf)?;
            p.attach()?;
        }
        Attach::FEntry(function) => {
            let p: &mut FEntry = program.try_into()?;
            p.load(function, btf)?;
            p.attach()?;
        }
    }
    Ok(())
}
