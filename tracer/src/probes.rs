//! Loading and attaching the kernel programs.
//!
//! Each hook of the compatibility table (`compat`) gets the first implementation this
//! kernel loads and attaches; the loader says which it chose, and names the phases lost
//! when none works instead of failing silently.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        cgroup_skb::CgroupSkbLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        sock_ops::SockOpsLinkId,
        uprobe::{UProbeLinkId, UProbeScope},
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, FEntry, FExit, Iter, KProbe,
        Lsm, RawTracePoint, SockOps, TracePoint, UProbe,
    },
    Btf, Ebpf, EbpfLoader,
};
use log::{debug, info, warn};
use tracer_common::{
    counter, dir, flags, kind, origin, EventHeader, KernelOffsets, ProgramConfig, Request, SockState, TupleKey,
    ACK_PENDING,
};

use crate::compat::{Attach, Hook, Implementation, Kind, HOOKS};

static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

pub struct LoadOptions {
    /// Hooks not to attach (by the name of one of their programs), to run as on a
    /// kernel without them.
    pub disabled: Vec<String>,
    /// Kinds of implementation not to use, to run as on a kernel without them.
    pub skip_kinds: Vec<Kind>,
    /// Which argument of `tcp_recvmsg` holds the flags (see `offsets::KernelFacts`).
    pub recvmsg_flags_arg: u32,
    pub offsets: KernelOffsets,
    pub config: ProgramConfig,
    pub ring_buffer_bytes: u32,
    pub max_sockets: u32,
    /// The cgroups (v2, by path) where the cgroup programs are attached at the start
    /// (the traced processes', or the root): the accept hook on the peer's address and
    /// the segment hook, when they are the ones chosen.
    pub cgroups: Vec<std::path::PathBuf>,
}

pub struct Probes {
    ebpf: Ebpf,
    /// Phases this kernel cannot measure, with the reason.
    pub unavailable: BTreeMap<&'static str, String>,
    /// Every hook: its implementation and whether it attached (the error if not).
    pub hooks: Vec<HookStatus>,
    /// Why tracing is impossible here: a hook every phase needs has no implementation.
    missing_required: Option<String>,
    /// The uprobes on TLS libraries, per traced process (0: every process).
    tls_links: BTreeMap<u32, Vec<(&'static str, UProbeLinkId)>>,
    tls_loaded: bool,
    /// Cgroups (by path) the record-layer program is attached to.
    record_cgroups: std::collections::BTreeSet<std::path::PathBuf>,
    /// The chosen implementations' cgroup programs (the accept hook on the peer's
    /// address, the segment hook), by name.
    cgroup_programs: Vec<(&'static str, Attach)>,
    /// The cgroups (by path) the cgroup programs are attached to, with their links: none
    /// below another (a cgroup program runs for every cgroup above the socket that has
    /// it attached).
    cgroup_links: BTreeMap<PathBuf, Vec<CgroupLink>>,
    /// The segment hook is the cgroup program, which follows TLS records too.
    segments_follow_records: bool,
    /// The accept hook is on the peer's address (a cgroup hook), and whether the
    /// syscall tracepoints were added for the accepts that ask for none.
    accept_at_peer: Option<AcceptFallback>,
    /// The state changes come from the socket-operation program: the open connections
    /// are flagged again whenever a cgroup is added.
    state_calls: bool,
}

/// One cgroup program attached to one cgroup.
enum CgroupLink {
    SockAddr(&'static str, CgroupSockAddrLinkId),
    Skb(&'static str, CgroupSkbLinkId),
    SockOps(&'static str, SockOpsLinkId),
}

/// The accept hook's second part, where its first is on the peer's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFallback {
    /// Not needed yet: every accept seen asked for the peer's address.
    Waiting,
    /// Attached, from the first accept that asked for no address on.
    Attached,
    /// Needed, but it would not attach (the error was said).
    Failed,
}

/// How one hook fared on this kernel (for `tracer doctor`).
pub struct HookStatus {
    pub hook: &'static str,
    /// The implementation in use; `None` when none works.
    pub implementation: Option<String>,
    pub needed_for: &'static str,
    /// Implementations tried or skipped before the one chosen (all of them when none
    /// works), each with the reason.
    pub passed_over: Vec<PassedOver>,
}

/// An implementation not used, and why.
pub struct PassedOver {
    pub implementation: String,
    pub why: String,
    /// What it needs of the kernel, when it was tried and failed.
    pub needs: Option<&'static str>,
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
            .override_global("RECVMSG_FLAGS_ARG", &opts.recvmsg_flags_arg, true)
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
        let mut unavailable = BTreeMap::new();
        let mut hooks = Vec::new();
        let mut missing_required = None;
        let mut cgroup_programs = Vec::new();
        let mut cgroup_links: BTreeMap<PathBuf, Vec<CgroupLink>> = BTreeMap::new();
        for hook in HOOKS {
            let (status, links) = choose(&mut ebpf, hook, opts, &btf);
            for (path, link) in links {
                cgroup_links.entry(path).or_default().push(link);
            }
            if let Some(chosen) = hook.implementations.iter().find(|i| status.implementation == Some(i.to_string())) {
                cgroup_programs
                    .extend(chosen.programs.iter().filter(|p| p.attach.on_cgroups()).map(|p| (p.name, p.attach)));
            }
            match &status.implementation {
                Some(chosen) => info!("{}: {chosen}", hook.name),
                None => {
                    let why = status
                        .passed_over
                        .iter()
                        .map(|p| format!("{}: {}", p.implementation, p.why))
                        .collect::<Vec<_>>()
                        .join("; ");
                    if hook.required {
                        // Said by `tracing_possible`, after every hook has been tried.
                        missing_required.get_or_insert_with(|| {
                            format!("no way to attach the {} hook on this kernel ({why})", hook.name)
                        });
                    } else {
                        warn!("{} hook unavailable ({why}): no {}", hook.name, hook.needed_for);
                        for phase in hook.phases {
                            unavailable
                                .entry(*phase)
                                .or_insert_with(|| format!("the {} hook is unavailable ({why})", hook.name));
                        }
                    }
                }
            }
            hooks.push(status);
        }
        let accept_at_peer = hooks
            .iter()
            .any(|h| h.implementation.as_deref().is_some_and(|i| i.starts_with("cgroup/getpeername")))
            .then_some(AcceptFallback::Waiting);
        let segments_follow_records =
            hooks.iter().any(|h| h.implementation.as_deref() == Some(&Attach::CgroupSkbIngress.to_string()));
        let state_calls = hooks.iter().any(|h| h.implementation.as_deref() == Some(&Attach::TcpIter.to_string()));
        Ok(Self {
            ebpf,
            unavailable,
            hooks,
            missing_required,
            tls_links: BTreeMap::new(),
            tls_loaded: false,
            record_cgroups: Default::default(),
            cgroup_programs,
            cgroup_links,
            segments_follow_records,
            accept_at_peer,
            state_calls,
        })
    }

    /// Hooks the calls of TLS library `lib` for process `pid` (every process that maps
    /// it, when `None`). On failure nothing of it stays attached.
    pub fn hook_tls(&mut self, lib: &crate::tls::Library, pid: Option<u32>) -> Result<()> {
        use crate::tls::{ENTRIES, RETURN_PROGRAM};
        if !self.tls_loaded {
            for name in ENTRIES.iter().map(|e| e.program).chain([RETURN_PROGRAM]) {
                let p: &mut UProbe = self
                    .ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing from the object"))?
                    .try_into()?;
                // One program may hook several functions.
                if p.fd().is_err() {
                    p.load().with_context(|| format!("loading {name}"))?;
                }
            }
            self.tls_loaded = true;
        }
        let scope = match pid.and_then(std::num::NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let mut links = Vec::new();
        let mut result = Ok(());
        for (entry, offset) in ENTRIES.iter().zip(&lib.offsets) {
            let Some(offset) = *offset else { continue };
            let programs = if entry.returns { &[entry.program, RETURN_PROGRAM][..] } else { &[entry.program][..] };
            for &name in programs {
                let p: &mut UProbe = self.ebpf.program_mut(name).expect("loaded above").try_into()?;
                match p.attach(offset, &lib.path, scope) {
                    Ok(id) => links.push((name, id)),
                    Err(e) => {
                        result = Err(anyhow::Error::new(e)
                            .context(format!("attaching a uprobe to {} in {}", entry.symbol, lib.name)));
                        break;
                    }
                }
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_err() {
            self.detach_tls(links);
            return result;
        }
        self.tls_links.entry(pid.unwrap_or(0)).or_default().extend(links);
        // From now on the socket hooks look for the threads' calls into the library.
        let mut hooked: aya::maps::Array<&mut MapData, u32> =
            aya::maps::Array::try_from(self.ebpf.map_mut("TLS_HOOKED").context("TLS_HOOKED map missing")?)?;
        hooked.set(0, 1, 0).context("turning the TLS hooks on")
    }

    /// Loads the record-layer program (TLS followed from its records), once.
    pub fn load_records(&mut self) -> Result<()> {
        let p: &mut CgroupSkb =
            self.ebpf.program_mut("tls_records").context("program tls_records missing from the object")?.try_into()?;
        if p.fd().is_err() {
            p.load().context("loading the record-layer program (cgroup socket-buffer)")?;
        }
        Ok(())
    }

    /// Attaches the record-layer program to the cgroup (v2) at `path`: it sees the
    /// segments received by sockets of processes in that cgroup and below.
    pub fn attach_records(&mut self, path: &Path) -> Result<bool> {
        // The segment hook, a cgroup program attached where this one would be, follows
        // them.
        if self.record_cgroups.contains(path) || self.segments_follow_records {
            return Ok(false);
        }
        self.load_records()?;
        let cgroup = std::fs::File::open(path).with_context(|| format!("opening cgroup {}", path.display()))?;
        let p: &mut CgroupSkb = self.ebpf.program_mut("tls_records").expect("loaded").try_into()?;
        // As a link (5.7 and later), which never displaces another program of the
        // cgroup; a link takes no attach flags, so the mode must be the default one.
        p.attach(&cgroup, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .with_context(|| format!("attaching the record-layer program to cgroup {}", path.display()))?;
        self.record_cgroups.insert(path.to_owned());
        Ok(true)
    }

    /// Whether accept is hooked on the peer's address (see [`Probes::attach_accept`]).
    pub fn accept_at_peer(&self) -> Option<AcceptFallback> {
        self.accept_at_peer
    }

    /// Attaches the cgroup programs (the accept hook on the peer's address, the segment
    /// hook; those of them chosen) to the cgroup (v2) at `path` as well: they run for the
    /// sockets of that cgroup and of those below it. A socket belongs to the cgroup of
    /// the process that made it, and an accepted connection to its listener's: a traced
    /// process's cgroup holds its own sockets, a listener's those of the connections it
    /// queues, wherever the process serving them is. Whether they were attached now.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<bool> {
        // Below a cgroup they are attached to, they run already.
        if self.cgroup_programs.is_empty() || self.cgroup_links.keys().any(|c| path.starts_with(c)) {
            return Ok(false);
        }
        let mut links = Vec::new();
        for &(name, how) in &self.cgroup_programs {
            match attach_to_cgroup(&mut self.ebpf, name, how, path) {
                Ok(link) => links.push(link),
                Err(e) => {
                    detach_links(&mut self.ebpf, links);
                    let e = e.context(format!("attaching {name}"));
                    if self.state_calls {
                        // That cgroup's connections would have no state changes at all:
                        // the state tracepoint takes them all from now on.
                        return Err(match self.state_tracepoint() {
                            Ok(hook) => e.context(format!("the state changes are taken by {hook} from now on")),
                            Err(more) => e.context(format!("and the state tracepoint would not attach: {more:#}")),
                        });
                    }
                    return Err(e);
                }
            }
        }
        // Those below now run the programs from here: their own links would run them a
        // second time.
        let below: Vec<PathBuf> = self.cgroup_links.keys().filter(|c| c.starts_with(path)).cloned().collect();
        for cgroup in below {
            let links = self.cgroup_links.remove(&cgroup).unwrap_or_default();
            detach_links(&mut self.ebpf, links);
        }
        self.cgroup_links.insert(path.to_owned(), links);
        if self.state_calls {
            // Its open connections had no call as they were established: flagged now.
            // (Every open connection is: the others' flags are set already.)
            match flag_open_sockets(&mut self.ebpf) {
                Ok(run) if run.refused > 0 => warn!(
                    "{} open connection(s) could not be flagged for their state changes (error {}): \
                     their closes are not seen",
                    run.refused, run.error
                ),
                Ok(_) => {}
                // The programs are attached all the same: only those connections' closes
                // may go unseen.
                Err(e) => warn!("flagging the open connections for their state changes: {e:#}"),
            }
        }
        Ok(true)
    }

    /// The state changes go back to the state tracepoint (from the socket-operation
    /// program, which a cgroup could not be given): attached first, then the program's
    /// handling turned off, so that no change falls between the two (one may be handled
    /// twice, which the programs tolerate). The tracepoint's implementation.
    fn state_tracepoint(&mut self) -> Result<String> {
        let hook = HOOKS.iter().find(|h| h.name == "state changes").expect("the state hook");
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let mut why = Vec::new();
        for implementation in hook.implementations.iter().filter(|i| i.kind() != Kind::Iter) {
            match attach_all(&mut self.ebpf, implementation, Some(&btf), &[]) {
                Ok(_) => {
                    set_state_calls(&mut self.ebpf, false);
                    self.state_calls = false;
                    let name = implementation.to_string();
                    if let Some(status) = self.hooks.iter_mut().find(|h| h.hook == hook.name) {
                        if let Some(chosen) = status.implementation.as_mut() {
                            *chosen = format!("{chosen}, then {name}");
                        }
                    }
                    return Ok(name);
                }
                Err(e) => why.push(format!("{implementation}: {e:#}")),
            }
        }
        bail!("{}", why.join("; "))
    }

    /// A traced process accepted a connection without asking for the peer's address,
    /// which the accept hook on it does not see: from now on accept is hooked on the
    /// syscall tracepoints as well. Nothing to do when the hook is another, or when this
    /// was done. The syscall tracepoints' implementation, when attached now.
    pub fn add_accept_fallback(&mut self) -> Result<Option<String>> {
        if self.accept_at_peer != Some(AcceptFallback::Waiting) {
            return Ok(None);
        }
        let hook = HOOKS.iter().find(|h| h.name == "accept").expect("the accept hook");
        let fallback = hook
            .implementations
            .iter()
            .find(|i| i.kind() == Kind::TracePoint)
            .expect("the accept hook ends with the syscall tracepoints");
        // Classic tracepoints: no BTF to read (which takes a while) before they attach.
        match attach_all(&mut self.ebpf, fallback, None, &[]) {
            Ok(_) => {
                self.accept_at_peer = Some(AcceptFallback::Attached);
                let name = fallback.to_string();
                if let Some(status) = self.hooks.iter_mut().find(|h| h.hook == "accept") {
                    if let Some(chosen) = status.implementation.as_mut() {
                        *chosen = format!("{chosen}, then {name}");
                    }
                }
                Ok(Some(name))
            }
            Err(e) => {
                self.accept_at_peer = Some(AcceptFallback::Failed);
                Err(e.context(format!("attaching {fallback}")))
            }
        }
    }

    /// Removes the uprobes of process `pid` (it exited).
    pub fn unhook_tls(&mut self, pid: u32) {
        if let Some(links) = self.tls_links.remove(&pid) {
            self.detach_tls(links);
        }
    }

    fn detach_tls(&mut self, links: Vec<(&'static str, UProbeLinkId)>) {
        for (name, id) in links {
            let Some(p) = self.ebpf.program_mut(name) else { continue };
            if let Err(e) = <&mut UProbe>::try_from(p).and_then(|p| p.detach(id)) {
                debug!("detaching {name}: {e}");
            }
        }
    }

    /// Whether every hook tracing cannot do without is attached; if not, why.
    pub fn tracing_possible(&self) -> Result<()> {
        match &self.missing_required {
            None => Ok(()),
            Some(why) => bail!("{why}; `tracer doctor` shows what the kernel offers"),
        }
    }

    pub fn add_pid(&mut self, tgid: u32) -> Result<()> {
        let mut pids: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("PIDS").context("PIDS map missing")?)?;
        pids.insert(tgid, 1, 0).with_context(|| format!("adding PID {tgid} to the traced set"))?;
        // The programs remember per CPU which thread groups are not traced, until this
        // count (userspace's slot) or theirs changes.
        let mut generation: aya::maps::Array<&mut MapData, u64> =
            aya::maps::Array::try_from(self.ebpf.map_mut("PIDS_GEN").context("PIDS_GEN map missing")?)?;
        let next = generation.get(&1, 0).unwrap_or(0).wrapping_add(1);
        generation.set(1, next, 0).context("invalidating the programs' memory of untraced processes")
    }

    /// An upstream connection the traced process had open before tracing started.
    pub fn add_existing_upstream(&mut self, key: TupleKey) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, TupleKey, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("EXISTING_CLIENTS").context("EXISTING_CLIENTS map missing")?)?;
        map.insert(key, 1, 0).context("registering an open upstream connection")
    }

    /// A traced cgroup (`--cgroup`), by its id.
    pub fn add_cgroup(&mut self, id: u64) -> Result<()> {
        let mut cgroups: BpfHashMap<&mut MapData, u64, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("CGROUPS").context("CGROUPS map missing")?)?;
        cgroups.insert(id, 1, 0).with_context(|| format!("adding cgroup {id}"))
    }

    /// Marks `port` as one a traced process listens on (`LISTENER_PORTS`, which only
    /// userspace writes): the setups of its connections are recorded once
    /// [`Probes::filter_setups`] is on.
    pub fn mark_listener_port(&mut self, port: u16) -> Result<()> {
        let mut marks: Array<&mut MapData, [u8; 8]> =
            Array::try_from(self.ebpf.map_mut("LISTENER_PORTS").context("LISTENER_PORTS map missing")?)?;
        let index = (port >> 3) as u32;
        let mut bytes = marks.get(&index, 0)?;
        bytes[(port & 7) as usize] = 1;
        marks.set(index, bytes, 0).with_context(|| format!("marking port {port}"))
    }

    /// From now on, a passive connection gets a state (its setup recorded) only on a
    /// marked port: the traced processes' listeners must be marked first.
    pub fn filter_setups(&mut self) -> Result<()> {
        let mut flag: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut("SETUP_FILTER").context("SETUP_FILTER map missing")?)?;
        flag.set(0, 1, 0).context("turning the setup filter on")
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
                header: EventHeader {
                    kind: kind::REQUEST,
                    tgid: st.owner,
                    tid: st.tid,
                    sock: sk,
                    ..Default::default()
                },
                arrival_ns: st.arrival_ns,
                first_read_ns: st.first_read_ns,
                last_read_ns: st.last_read_ns,
                first_write_ns: st.first_write_ns,
                last_write_ns: st.last_write_ns,
                // Not acknowledged yet (or its first write still under way): its delivery
                // is still going on, so it has none.
                acked_ns: if st.acked_ns == ACK_PENDING { 0 } else { st.acked_ns },
                bytes_in: st.req_in,
                bytes_out: st.req_out,
                index: st.requests,
                flags: st.req_flags
                    | if st.acked_ns == 0 || st.acked_ns == ACK_PENDING { flags::UNDELIVERED } else { 0 },
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

    /// Makes the state-change programs run once now (a listen() on a loopback port, then
    /// its close: no packet), so that they note the jiffy they were attached in, and lets
    /// that jiffy pass. (Where the socket-operation program takes the state changes, the
    /// iterator that flagged the open connections has noted it already.) A connection the kernel establishes from here on is in a later
    /// jiffy: accepted with no setup record, it is a missed setup (`MISSED_SETUPS`).
    pub fn note_attached(&mut self) -> Result<()> {
        drop(std::net::TcpListener::bind("127.0.0.1:0"));
        // A jiffy is at most 10 ms (HZ >= 100).
        std::thread::sleep(std::time::Duration::from_millis(20));
        // The moment the programs' clock (CLOCK_MONOTONIC) says, for `HOOKED_NS`.
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
        let mut hooked: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut("HOOKED_NS").context("HOOKED_NS map missing")?)?;
        hooked.set(0, ns, 0).context("noting when the hooks were in place")
    }

    pub fn lost_events(&self) -> u64 {
        self.counter(counter::LOST_EVENTS).unwrap_or(0)
    }

    /// Runs of each program the kernel skipped (by program name, only those with any):
    /// a program does not run while it is already running on the same CPU, so a hook
    /// hit in a softirq that interrupted the same program is not given to it. The
    /// kernel counts these per program (`recursion_misses`, kernels 5.12 and later).
    pub fn skipped_runs(&self) -> BTreeMap<String, u64> {
        let mut skipped = BTreeMap::new();
        for (name, program) in self.ebpf.programs() {
            let Ok(fd) = program.fd() else { continue };
            let fd = fd.as_fd().as_raw_fd();
            let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else { continue };
            let misses = info
                .lines()
                .find_map(|line| line.strip_prefix("recursion_misses:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if misses > 0 {
                skipped.insert(name.to_string(), misses);
            }
        }
        skipped
    }
}

/// The first implementation of `hook` that loads and attaches here, with the links of
/// its cgroup programs.
fn choose(
    ebpf: &mut Ebpf,
    hook: &'static Hook,
    opts: &LoadOptions,
    btf: &Btf,
) -> (HookStatus, Vec<(PathBuf, CgroupLink)>) {
    let mut status =
        HookStatus { hook: hook.name, implementation: None, needed_for: hook.needed_for, passed_over: Vec::new() };
    if let Some(program) = opts.disabled.iter().find(|p| hook.has_program(p)) {
        status.passed_over.push(PassedOver {
            implementation: "all".into(),
            why: format!("disabled with --disable-hook {program}"),
            needs: None,
        });
        return (status, Vec::new());
    }
    let unmet = (hook.precondition)(&opts.config).err();
    for implementation in hook.implementations {
        let (why, needs) = if opts.skip_kinds.contains(&implementation.kind()) {
            (format!("skipped (--skip-hook-kind {})", implementation.kind()), None)
        } else if let Some(why) = unmet {
            (why.to_owned(), None)
        } else {
            match attach_all(ebpf, implementation, Some(btf), &opts.cgroups) {
                Ok(links) => {
                    status.implementation = Some(implementation.to_string());
                    return (status, links);
                }
                Err(e) => {
                    debug!("{}: {implementation} unavailable: {e:#}", hook.name);
                    (short_error(&e), Some(implementation.needs))
                }
            }
        };
        status.passed_over.push(PassedOver { implementation: implementation.to_string(), why, needs });
    }
    (status, Vec::new())
}

/// The gist of a load or attach error, on one line: the errno, and of a verifier log
/// (which runs to pages) the line that says why it refused, near its end.
fn short_error(e: &anyhow::Error) -> String {
    let text = format!("{e:#}").replace("the BPF_PROG_LOAD syscall returned ", "load failed: ");
    let (head, log) = match text.split_once(". Verifier output:") {
        Some((head, log)) => (head.to_owned(), log),
        None => (text.lines().next().unwrap_or("").to_owned(), ""),
    };
    // Not the cause: statistics, and the error's own source repeated after the log.
    let noise = |l: &&str| {
        let l = l.trim().trim_start_matches(':').trim();
        l.is_empty()
            || head.contains(l)
            || l.starts_with("processed ")
            || l.starts_with("verification time")
            || l.starts_with("stack depth")
    };
    let cause = log.lines().rev().find(|l| !noise(l)).map(|l| l.trim().trim_start_matches(':').trim());
    let line = match cause {
        Some(cause) => format!("{head}: {cause}"),
        None => head,
    };
    line.chars().take(200).collect()
}

/// Attaches every program of `implementation`; on failure, detaches those already
/// attached so that nothing of it stays behind. The links of its cgroup programs.
fn attach_all(
    ebpf: &mut Ebpf,
    implementation: &Implementation,
    btf: Option<&Btf>,
    cgroups: &[PathBuf],
) -> Result<Vec<(PathBuf, CgroupLink)>> {
    let mut attached = Vec::new();
    let mut links = Vec::new();
    for program in implementation.programs {
        match attach(ebpf, program.name, program.attach, btf, cgroups) {
            Ok(mut more) => {
                attached.push(program);
                links.append(&mut more);
            }
            Err(e) if program.optional => debug!("{} not attached (optional): {e:#}", program.attach),
            Err(e) => {
                for done in attached {
                    unload(ebpf, done.name, done.attach);
                }
                // Name the program when the implementation has several.
                return Err(if implementation.programs.len() > 1 { e.context(program.attach.to_string()) } else { e });
            }
        }
    }
    Ok(links)
}

/// Detaches and unloads program `name` (attached as `how`).
fn unload(ebpf: &mut Ebpf, name: &str, how: Attach) {
    let Some(program) = ebpf.program_mut(name) else { return };
    let result = match how {
        Attach::TpBtf(_) => <&mut BtfTracePoint>::try_from(program).and_then(|p| p.unload()),
        Attach::RawTp(_) => <&mut RawTracePoint>::try_from(program).and_then(|p| p.unload()),
        Attach::TracePoint(..) => <&mut TracePoint>::try_from(program).and_then(|p| p.unload()),
        Attach::FEntry(_) => <&mut FEntry>::try_from(program).and_then(|p| p.unload()),
        Attach::FExit(_) => <&mut FExit>::try_from(program).and_then(|p| p.unload()),
        Attach::KProbe(_) | Attach::KRetProbe(_) => <&mut KProbe>::try_from(program).and_then(|p| p.unload()),
        Attach::Lsm(_) => <&mut Lsm>::try_from(program).and_then(|p| p.unload()),
        Attach::CgroupSockAddr(_) => <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.unload()),
        Attach::CgroupSkbIngress => <&mut CgroupSkb>::try_from(program).and_then(|p| p.unload()),
        Attach::CgroupSockOps(_) => <&mut SockOps>::try_from(program).and_then(|p| p.unload()),
        Attach::TcpIter => {
            set_state_calls(ebpf, false);
            match ebpf.program_mut(name) {
                Some(program) => <&mut Iter>::try_from(program).and_then(|p| p.unload()),
                None => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!("unloading {name}: {e}");
    }
}

/// Attaches program `name` as `how`; a cgroup program to each of `cgroups` (its links).
/// The typed kinds need the kernel's `btf`.
fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    how: Attach,
    btf: Option<&Btf>,
    cgroups: &[PathBuf],
) -> Result<Vec<(PathBuf, CgroupLink)>> {
    let program = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the object"))?;
    let typed = || btf.ok_or_else(|| anyhow!("{how} needs the kernel's BTF"));
    match how {
        Attach::TpBtf(tracepoint) => {
            let p: &mut BtfTracePoint = program.try_into()?;
            p.load(tracepoint, typed()?)?;
            p.attach()?;
        }
        Attach::RawTp(tracepoint) => {
            let p: &mut RawTracePoint = program.try_into()?;
            p.load()?;
            p.attach(tracepoint)?;
        }
        Attach::TracePoint(category, tracepoint) => {
            ensure_tracefs()?;
            let p: &mut TracePoint = program.try_into()?;
            p.load()?;
            p.attach(category, tracepoint)?;
        }
        Attach::FEntry(function) => {
            let p: &mut FEntry = program.try_into()?;
            p.load(function, typed()?)?;
            p.attach()?;
        }
        Attach::FExit(function) => {
            let p: &mut FExit = program.try_into()?;
            p.load(function, typed()?)?;
            p.attach()?;
        }
        Attach::KProbe(function) | Attach::KRetProbe(function) => {
            if !Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
                return Err(anyhow!("this kernel has no kprobes (CONFIG_KPROBES)"));
            }
            let p: &mut KProbe = program.try_into()?;
            p.load()?;
            p.attach(function, 0)?;
        }
        Attach::Lsm(hook) => {
            // A BPF LSM program attaches wherever the kernel has the hook, and then never
            // runs unless the `bpf` LSM is among the active ones.
            let active = active_lsms()?;
            if !active.split(',').any(|m| m == "bpf") {
                return Err(anyhow!(
                    "the BPF LSM is not active (active: {active}; it needs `bpf` in the lsm= boot option)"
                ));
            }
            let p: &mut Lsm = program.try_into()?;
            p.load(hook, typed()?)?;
            p.attach()?;
        }
        Attach::CgroupSockAddr(_) | Attach::CgroupSkbIngress | Attach::CgroupSockOps(_) => {
            // To the cgroups of the processes traced now (the root in port mode); those
            // the session finds later, of processes and of their listeners' sockets, are
            // added as it finds them (`Probes::attach_cgroup`).
            if cgroups.is_empty() {
                return Err(anyhow!("the traced processes' cgroups (v2) are not known"));
            }
            match how {
                Attach::CgroupSkbIngress => <&mut CgroupSkb>::try_from(program)?.load()?,
                Attach::CgroupSockOps(_) => <&mut SockOps>::try_from(program)?.load()?,
                _ => <&mut CgroupSockAddr>::try_from(program)?.load()?,
            }
            let mut links = Vec::new();
            for path in cgroups {
                match attach_to_cgroup(ebpf, name, how, path) {
                    Ok(link) => links.push((path.clone(), link)),
                    Err(e) => {
                        detach_links(ebpf, links.into_iter().map(|(_, link)| link).collect());
                        return Err(e);
                    }
                }
            }
            return Ok(links);
        }
        Attach::TcpIter => {
            // The socket-operation program must be there to take the calls.
            let sock_ops = ebpf.program(SOCK_OPS_PROGRAM).is_some_and(|p| p.fd().is_ok());
            if !sock_ops {
                return Err(anyhow!("the socket-operation program ({SOCK_OPS_PROGRAM}) is not attached here"));
            }
            let program = ebpf.program_mut(name).expect("found above");
            let p: &mut Iter = program.try_into()?;
            p.load("tcp", typed()?)?;
            set_state_calls(ebpf, true);
            // One connection of its own at least, so that the first run shows whether the
            // kernel lets the iterator flag sockets.
            let own = own_connection();
            let run = flag_open_sockets(ebpf);
            drop(own);
            let refused = match run {
                Ok(run) if run.flagged > 0 && run.refused == 0 => None,
                Ok(run) if run.refused > 0 => Some(format!(
                    "the kernel refused to set socket-operation flags from the TCP iterator (error {}; 6.12+)",
                    run.error
                )),
                Ok(_) => Some("the TCP iterator found no open connection to flag".to_owned()),
                Err(e) => Some(format!("{e:#}")),
            };
            if let Some(why) = refused {
                set_state_calls(ebpf, false);
                return Err(anyhow!(why));
            }
        }
    }
    Ok(Vec::new())
}

/// The socket-operation program.
const SOCK_OPS_PROGRAM: &str = "socket_ops";

/// Turns the socket-operation program's handling of state changes on or off.
fn set_state_calls(ebpf: &mut Ebpf, on: bool) {
    let result = ebpf
        .map_mut("STATE_CALLS")
        .context("STATE_CALLS map missing")
        .and_then(|map| Ok(Array::<&mut MapData, u32>::try_from(map)?))
        .and_then(|mut calls| Ok(calls.set(0, on as u32, 0)?));
    if let Err(e) = result {
        warn!("turning the socket-operation program's state changes {}: {e:#}", if on { "on" } else { "off" });
    }
}

/// A loopback connection of the tracer's own, open while the result is kept.
fn own_connection() -> Option<(std::net::TcpListener, std::net::TcpStream)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    let client = std::net::TcpStream::connect(listener.local_addr().ok()?).ok()?;
    Some((listener, client))
}

/// What one pass of the flagging iterator did, over every network namespace.
#[derive(Debug, Default)]
struct FlagRun {
    flagged: i64,
    refused: i64,
    /// The last refusal's error (a negative errno).
    error: i64,
}

/// Runs the TCP iterator `flag_open_sockets` in every network namespace of the
/// machine (those of its processes): each open connection there is flagged, so that the
/// socket-operation program is told of its state changes.
fn flag_open_sockets(ebpf: &mut Ebpf) -> Result<FlagRun> {
    let mut counts: Array<&mut MapData, i64> =
        Array::try_from(ebpf.map_mut("FLAGGING").context("FLAGGING map missing")?)?;
    for i in 0..3 {
        counts.set(i, 0, 0)?;
    }
    let own = namespace_of("self");
    let mut others = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some(ns) = namespace_of(&pid.to_string()).filter(|ns| Some(*ns) != own) {
            others.entry(ns).or_insert(pid);
        }
    }
    let p: &mut Iter = ebpf
        .program_mut("flag_open_sockets")
        .context("program flag_open_sockets missing from the object")?
        .try_into()?;
    run_iterator(p, None)?;
    for pid in others.into_values() {
        // A process that has exited since has taken its namespace's sockets with it.
        if let Err(e) = run_iterator(p, Some(pid)) {
            debug!("flagging the connections in the network namespace of {pid}: {e:#}");
        }
    }
    let counts: Array<&MapData, i64> = Array::try_from(ebpf.map("FLAGGING").context("FLAGGING map missing")?)?;
    Ok(FlagRun { flagged: counts.get(&0, 0)?, refused: counts.get(&1, 0)?, error: counts.get(&2, 0)? })
}

/// The network namespace (its inode) of process `pid` ("self" for this one).
fn namespace_of(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino())
}

/// Runs iterator `p` once to its end, over the TCP sockets of this process's network
/// namespace, or of process `pid`'s: an iterator covers the namespace of the thread that
/// opens it, here one that enters that namespace for the purpose.
fn run_iterator(p: &mut Iter, pid: Option<u32>) -> Result<()> {
    use std::io::Read;
    let id = p.attach().context("attaching the TCP iterator")?;
    let link = p.take_link(id)?;
    let read = move || -> Result<()> {
        if let Some(pid) = pid {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("entering the network namespace");
            }
        }
        let mut file = link.into_file().context("opening the TCP iterator")?;
        let mut sink = Vec::new();
        file.read_to_end(&mut sink).context("running the TCP iterator")?;
        Ok(())
    };
    match pid {
        None => read(),
        // A thread of its own, which ends in that namespace.
        Some(_) => std::thread::scope(|s| s.spawn(read).join().unwrap_or_else(|_| Err(anyhow!("the thread panicked")))),
    }
}

/// Attaches cgroup program `name` (loaded; attached as `how`) to the cgroup (v2) at
/// `path`. As a link (5.7 and later), which never displaces another program of the
/// cgroup nor keeps one from being attached below it (a link takes no attach flags).
fn attach_to_cgroup(ebpf: &mut Ebpf, name: &'static str, how: Attach, path: &Path) -> Result<CgroupLink> {
    let cgroup = std::fs::File::open(path).with_context(|| format!("opening cgroup {}", path.display()))?;
    let program = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the object"))?;
    let link = match how {
        Attach::CgroupSkbIngress => {
            let p: &mut CgroupSkb = program.try_into()?;
            CgroupLink::Skb(name, p.attach(&cgroup, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)?)
        }
        Attach::CgroupSockOps(_) => {
            let p: &mut SockOps = program.try_into()?;
            CgroupLink::SockOps(name, p.attach(&cgroup, CgroupAttachMode::Single)?)
        }
        _ => {
            let p: &mut CgroupSockAddr = program.try_into()?;
            CgroupLink::SockAddr(name, p.attach(&cgroup, CgroupAttachMode::Single)?)
        }
    };
    debug!("{name} attached to cgroup {}", path.display());
    Ok(link)
}

fn detach_links(ebpf: &mut Ebpf, links: Vec<CgroupLink>) {
    for link in links {
        let (name, result) = match link {
            CgroupLink::SockAddr(name, id) => {
                (name, ebpf.program_mut(name).map(|p| <&mut CgroupSockAddr>::try_from(p).and_then(|p| p.detach(id))))
            }
            CgroupLink::Skb(name, id) => {
                (name, ebpf.program_mut(name).map(|p| <&mut CgroupSkb>::try_from(p).and_then(|p| p.detach(id))))
            }
            CgroupLink::SockOps(name, id) => {
                (name, ebpf.program_mut(name).map(|p| <&mut SockOps>::try_from(p).and_then(|p| p.detach(id))))
            }
        };
        if let Some(Err(e)) = result {
            debug!("detaching {name}: {e}");
        }
    }
}

/// The active LSMs, as `/sys/kernel/security/lsm` lists them (securityfs is mounted when
/// it is not).
fn active_lsms() -> Result<String> {
    const LIST: &str = "/sys/kernel/security/lsm";
    if !Path::new(LIST).exists() {
        let (source, target, fstype) = (c"securityfs", c"/sys/kernel/security", c"securityfs");
        let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(anyhow!(
                "cannot mount securityfs to read the active LSMs: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(std::fs::read_to_string(LIST).with_context(|| format!("reading {LIST}"))?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::short_error;

    #[test]
    fn short_error_keeps_the_verifiers_reason() {
        let e = anyhow::anyhow!(
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: arg#0 type is not a struct\n\
             0: (79) r6 = *(u64 *)(r1 +104)\nR1 invalid ctx access off=0 size=8\nprocessed 12 insns (limit 1000000)\n"
        );
        assert_eq!(short_error(&e), "load failed: Permission denied (os error 13): R1 invalid ctx access off=0 size=8");
        let e = anyhow::anyhow!(
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: func 'tcp_recvmsg' doesn't have 7-th argument\n\
             processed 0 insns (limit 1000000)\n: Permission denied (os error 13)"
        );
        assert_eq!(
            short_error(&e),
            "load failed: Permission denied (os error 13): func 'tcp_recvmsg' doesn't have 7-th argument"
        );
        let e = anyhow::anyhow!(
            "the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1). Verifier output: : "
        );
        assert_eq!(short_error(&e), "load failed: Operation not permitted (os error 1)");
        let e = anyhow::anyhow!("unknown BTF type `btf_trace_sock_recv_length`");
        assert_eq!(short_error(&e), "unknown BTF type `btf_trace_sock_recv_length`");
    }
}
