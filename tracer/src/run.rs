//! The tracing session: attach, read events until told to stop, report.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{self, IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracer_common::{counter, ProgramConfig};

use crate::{
    cgroups::Cgroup,
    checks::{self, Verdict},
    cli::{Args, OutputFormat},
    command::Launched,
    compat::Kind,
    events::{self, Event},
    labels::Routes,
    listeners::{ListenerId, ListenerWatch},
    metrics, offsets,
    probes::{AcceptFallback, LoadOptions, Probes},
    procs,
    report::{json::Json, text::Text, Format, ReportKind, Slow, Snapshot},
    sockets,
    stats::{MaxLabels, Stats},
    timeline::{Record, Timeline},
    tls,
};

/// A line on stderr. Unlike `eprintln!`, never panics: a closed stderr (its reader
/// gone) must not stop the tracer or cost the report.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

/// Like `say!`, without the newline (the status line).
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        let _ = write!(io::stderr(), $($arg)*);
    }};
}

pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().filter_map(|e| e.downcast_ref::<io::Error>()).any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn print(text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

struct Session {
    format: Box<dyn Format>,
    print_connections: bool,
    timeline: Timeline,
    stats: Stats,
    records: Vec<Record>,
    /// Traced processes still alive (PID mode).
    live: HashSet<u32>,
    started: Instant,
    decode_errors: u64,
    listeners: ListenerWatch,
    /// SYN-ACK retransmits per listening port not yet known to be a traced listener's:
    /// the kernel programs see every listener's handshakes (a request socket does not
    /// say which process listens), so they count only once the port is found among the
    /// traced processes' listeners or connections.
    synacks_pending: BTreeMap<ListenerId, u64>,
    /// `--slow`, in nanoseconds.
    slow_ns: Option<u64>,
    /// `--cgroup`: the traced cgroups, and the ids the programs know.
    cgroups: Vec<Cgroup>,
    cgroup_ids: HashSet<u64>,
    /// In process (and cgroup) mode, the traced listeners' ports marked in the programs
    /// so far (see `Probes::filter_setups`); `None` in port mode.
    marked_ports: Option<HashSet<u16>>,
    /// The traced listeners' cgroups (by id) already given the cgroup programs.
    listener_cgroups: HashSet<u64>,
}

impl Session {
    fn handle(&mut self, bytes: &[u8]) -> Result<()> {
        // The first bytes of a request or response: taken in place (they make no record).
        let kind = bytes.get(..2).map(|k| u16::from_ne_bytes([k[0], k[1]]));
        if kind == Some(tracer_common::kind::PAYLOAD) {
            if let Ok((p, data)) = events::payload(bytes) {
                self.stats.events += 1;
                self.timeline.payload(&p, data);
                return Ok(());
            }
        }
        // An exchange, then the next request's first bytes (in place too).
        if kind == Some(tracer_common::kind::REQUEST_SHORT_PAYLOAD) {
            if let Ok((request, p, data)) = events::request_then_payload(bytes) {
                self.stats.events += 1;
                self.apply(Event::Request(request))?;
                self.timeline.payload(&p, data);
                return Ok(());
            }
        }
        let event = match events::decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                self.decode_errors += 1;
                if self.decode_errors == 1 {
                    warn!("undecodable event: {e:#}");
                }
                return Ok(());
            }
        };
        self.stats.events += 1;
        self.apply(event)
    }

    fn apply(&mut self, event: Event) -> Result<()> {
        match event {
            Event::ProcessFork(p) => {
                self.live.insert(p.child);
            }
            Event::ProcessExit(p) => {
                self.live.remove(&p.header.tgid);
            }
            _ => {}
        }
        self.records.clear();
        self.timeline.apply(&event, &mut self.records);
        for record in &self.records {
            if let Record::SynAckRetransmit { listener } = record {
                *self.synacks_pending.entry(*listener).or_default() += 1;
                continue;
            }
            self.stats.apply(record);
            if let Record::Closed(conn) = record {
                if self.print_connections {
                    print(&self.format.connection(conn))?;
                }
            }
            if let Some(slow) = self.slow_ns.and_then(|t| Slow::from_record(record, t)) {
                print(&self.format.slow(&slow))?;
            }
        }
        Ok(())
    }

    /// `--cgroup`: cgroups created below the traced ones since, and processes started
    /// or moved there (the programs trace these on their own; this is for what userspace
    /// looks at per process: listeners, TLS libraries).
    fn follow_cgroups(&mut self, probes: &mut Probes) {
        for cg in &self.cgroups {
            for id in cg.ids() {
                if !self.cgroup_ids.contains(&id) && probes.add_cgroup(id).is_ok() {
                    self.cgroup_ids.insert(id);
                }
            }
            for pid in cg.processes() {
                if self.live.insert(pid) {
                    let _ = probes.add_pid(pid);
                }
            }
        }
    }

    /// Upstream requests still waiting to be tied to a server request never will be.
    fn finish_attribution(&mut self) {
        self.records.clear();
        self.timeline.finish(&mut self.records);
        for record in &self.records {
            self.stats.apply(record);
        }
    }

    /// Where accept is hooked on the peer's address: as soon as a traced server is seen
    /// to accept without asking for it (checked at every drain), accept is hooked on the
    /// syscall tracepoints too.
    fn watch_accepts(&mut self, probes: &mut Probes) {
        if probes.accept_at_peer() != Some(AcceptFallback::Waiting) {
            return;
        }
        self.stats.unseen_accepts = probes.counter(counter::UNSEEN_ACCEPTS).unwrap_or(0);
        if self.stats.unseen_accepts == 0 {
            return;
        }
        match probes.add_accept_fallback() {
            Ok(Some(hook)) => say!(
                "tracer: a traced process accepts connections without asking for the peer's address, \
                 which the accept hook here does not see: accept is now hooked on {hook} too (every system \
                 call on this machine takes the kernel's tracing path while the tracer runs); the accept \
                 wait of the {} connection(s) before runs to their first read or write",
                self.stats.unseen_accepts
            ),
            Ok(None) => {}
            Err(e) => say!(
                "tracer: warning: accepts that ask for no peer address are seen at the connection's first \
                 read or write (their accept wait runs to it): {e:#}"
            ),
        }
    }

    /// The cgroup programs go to the cgroups of the traced listeners' sockets too, which
    /// their connections belong to: a listener made in another cgroup than the one its
    /// server runs in (handed over by systemd, or made before the server moved).
    fn follow_listener_cgroups(&mut self, probes: &mut Probes) {
        for id in self.listeners.cgroups() {
            if !self.listener_cgroups.insert(id) {
                continue;
            }
            let Some(path) = crate::cgroups::path_of(id) else {
                debug!("listener cgroup {id} not found in the hierarchy");
                continue;
            };
            match probes.attach_cgroup(&path) {
                Ok(true) => info!("cgroup programs attached to {} (a traced listener's)", path.display()),
                Ok(false) => {}
                Err(e) => say!("tracer: warning: the cgroup programs are not attached to {}: {e:#}", path.display()),
            }
        }
    }

    /// Reads the kernel-side counters that are not events: lost events, missed setups and
    /// listen drops.
    fn poll_counters(&mut self, probes: &mut Probes) {
        self.stats.lost_events = probes.lost_events();
        self.stats.missed_setups = probes.counter(counter::MISSED_SETUPS).unwrap_or(0);
        self.stats.unseen_accepts = probes.counter(counter::UNSEEN_ACCEPTS).unwrap_or(0);
        self.stats.skipped_runs = probes.skipped_runs();
        // In port mode and with `--all` the processes serving are known from their
        // connections: their network namespaces hold listeners too (containers').
        let mut pids = self.live.clone();
        pids.extend(self.stats.listeners.values().flat_map(|l| l.processes.keys().copied()));
        pids.retain(|&pid| procs::is_alive(pid));
        self.listeners.refresh(&pids, |cookie| probes.ack_overflows(cookie));
        self.follow_listener_cgroups(probes);
        if let Some(marked) = self.marked_ports.as_mut() {
            for port in self.listeners.ports() {
                if !marked.contains(&port) {
                    match probes.mark_listener_port(port) {
                        Ok(()) => _ = marked.insert(port),
                        Err(e) => warn!("{e:#}"),
                    }
                }
            }
        }
        for (id, drops) in self.listeners.drops() {
            self.stats.listener(id).listen_drops = drops;
        }
        for (id, addresses) in self.listeners.addresses() {
            self.stats.listener(id).addresses = addresses;
        }
        let stats = &mut self.stats;
        self.synacks_pending.retain(|id, count| match stats.listeners.get_mut(id) {
            Some(l) => {
                l.synack_retransmits += *count;
                false
            }
            None => true,
        });
    }

    fn report(&mut self, kind: ReportKind, checks: &[Verdict]) -> Result<()> {
        let snapshot = Snapshot { kind, stats: &self.stats, elapsed_s: self.started.elapsed().as_secs_f64(), checks };
        print(&self.format.report(&snapshot))?;
        Ok(())
    }

    fn status_line(&self) -> String {
        format!(
            "\rtracing {:.0}s: {} connections ({} open), {} requests, {} events, {} lost ",
            self.started.elapsed().as_secs_f64(),
            self.stats.total_connections(),
            self.timeline.open_connections(),
            self.stats.total_requests(),
            self.stats.events,
            self.stats.lost_events,
        )
    }
}

/// Makes the tracer a batch task (SCHED_BATCH): it keeps its fair share of the CPU, but
/// its wake-ups (every drain) no longer preempt the task running on that CPU, typically
/// the traced server; it runs at that task's next scheduling point instead. Each drain
/// is a burst of work that the server, preempted, would wait out with requests in hand:
/// on a saturated nginx this added some 200 µs to p99 latency (`cargo xtask bench`,
/// side by side: +63 µs against +243 µs). Children do not inherit it
/// (SCHED_RESET_ON_FORK), and a kernel that refuses it only costs that latency.
fn never_preempt_on_wakeup() {
    // The system call itself: musl's wrapper refuses (ENOSYS), because Linux applies it
    // to the calling thread only, which is what is wanted here. The kernel reads one
    // int, the priority: 0, the only one SCHED_BATCH takes.
    let priority: libc::c_int = 0;
    let policy = libc::SCHED_BATCH | libc::SCHED_RESET_ON_FORK;
    // SAFETY: plain system call on the calling thread, with a valid parameter block.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setscheduler, 0, policy, &priority) };
    if ret != 0 {
        debug!("not a batch task: {}", io::Error::last_os_error());
    }
}

/// Events handled between offers of the CPU to other runnable tasks (about 60 µs of
/// work): a drain of 50 ms of a busy server's events is some 5,000, and a server that
/// waited for all of them would add their whole time to the latency of the requests it
/// holds (p99 +128 µs against −36 µs with these pauses, side by side).
const EVENTS_PER_TURN: u32 = 512;

fn drain(ring: &mut RingBuf<MapData>, session: &mut Session) -> Result<()> {
    let mut handled = 0u32;
    while let Some(item) = ring.next() {
        session.handle(&item)?;
        handled += 1;
        if handled % EVENTS_PER_TURN == 0 {
            // Returns at once when nothing else wants this CPU.
            std::thread::yield_now();
        }
    }
    Ok(())
}

pub fn run(args: Args) -> Result<i32> {
    args.validate()?;
    for &pid in &args.pids {
        procs::validate(pid)?;
    }
    let kernel = offsets::from_running_kernel()?;
    // A command is started now but held before its first instruction until its PID is
    // registered below.
    let mut launched = match args.command.is_empty() {
        true => None,
        false => Some(Launched::spawn(&args.command)?),
    };
    let roots: Vec<u32> = match &launched {
        Some(l) => vec![l.pid],
        None => args.pids.clone(),
    };
    let mut cgroups: Vec<Cgroup> = args.cgroups.iter().map(|p| Cgroup::resolve(p)).collect::<Result<_>>()?;
    for id in &args.containers {
        let cg = Cgroup::container(id)?;
        say!("tracer: container {id}: cgroup {}", cg.dir.display());
        cgroups.push(cg);
    }
    let labels_on = args.labels_on() && kernel.labels_unavailable.is_none();
    if let (true, Some(why)) = (args.labels_on(), kernel.labels_unavailable) {
        say!("tracer: --labels: {why}; requests are unlabelled");
    }
    // The cgroup programs (accept on the peer's address, the segment hook) are attached
    // with the other hooks to the cgroups of what is traced now (the root in port mode);
    // the cgroups of processes found later, and of the traced listeners' sockets, are
    // added as they are found.
    let process_mode = args.ports.is_empty() && !args.all;
    let program_cgroups: Vec<PathBuf> = if !process_mode {
        tls::cgroup2_root().into_iter().collect()
    } else if !cgroups.is_empty() {
        cgroups.iter().map(|cg| cg.dir.clone()).collect()
    } else {
        let dirs: std::collections::BTreeSet<PathBuf> =
            procs::with_descendants(&roots).into_iter().filter_map(tls::cgroup_of).collect();
        dirs.iter().filter(|d| !dirs.iter().any(|a| a != *d && d.starts_with(a))).cloned().collect()
    };
    let mut probes = Probes::load(&LoadOptions {
        disabled: args.disable_hook.clone(),
        skip_kinds: args.skip_hook_kind.clone(),
        recvmsg_flags_arg: kernel.recvmsg_flags_arg,
        offsets: kernel.offsets,
        config: ProgramConfig {
            filter_by_port: (!args.ports.is_empty() || args.all) as u32,
            all_ports: args.all as u32,
            drop_reason_listen_overflow: kernel.drop_reason_listen_overflow.unwrap_or(u32::MAX),
            tls_hooks: !args.skip_hook_kind.contains(&Kind::UProbe) as u32,
            tls_records: tls::cgroup2_root().is_some() as u32,
            labels: labels_on as u32,
            filter_by_cgroup: !cgroups.is_empty() as u32,
            task_btf: kernel.task_btf as u32,
            ..ProgramConfig::default()
        },
        ring_buffer_bytes: args.ring_buffer_size,
        max_sockets: args.max_sockets,
        cgroups: program_cgroups,
    })?;
    probes.tracing_possible()?;
    probes.note_attached()?;
    let mut live = HashSet::new();
    // Register first, then look for descendants: a child forked in between is caught by
    // the fork hook, one forked before by the /proc scan.
    for &pid in &roots {
        probes.add_pid(pid)?;
    }
    let mut cgroup_ids = HashSet::new();
    for cg in &cgroups {
        for id in cg.ids() {
            if cgroup_ids.insert(id) {
                probes.add_cgroup(id)?;
            }
        }
    }
    let initial: Vec<u32> = if cgroups.is_empty() {
        procs::with_descendants(&roots)
    } else {
        cgroups.iter().flat_map(Cgroup::processes).collect()
    };
    // The ports the traced processes listen on: their connections' setups are recorded
    // (see `Probes::filter_setups`; the listener watch adds those it finds later).
    let mut listening = HashSet::new();
    for pid in initial {
        probes.add_pid(pid)?;
        live.insert(pid);
        let open = sockets::open_sockets(pid);
        if process_mode {
            for port in open.listening {
                if listening.insert(port) {
                    probes.mark_listener_port(port)?;
                }
            }
        }
        // Connections it opened before tracing started (pools of database connections).
        for key in open.upstreams {
            if let Err(e) = probes.add_existing_upstream(key) {
                warn!("{e:#}");
                break;
            }
        }
    }
    for &port in &args.ports {
        probes.add_port(port)?;
        if !sockets::is_listening(port) {
            say!("tracer: warning: nothing listens on port {port} yet; its connections are traced once something does");
        }
    }
    let ring = probes.take_events()?;
    // Hooks on other than their first implementation: said once, so that a report from
    // an older kernel says how it was measured.
    let fallbacks: Vec<String> = probes
        .hooks
        .iter()
        .filter(|h| !h.passed_over.is_empty())
        .filter_map(|h| Some(format!("{} {}", h.hook, h.implementation.as_ref()?)))
        .collect();
    if !fallbacks.is_empty() {
        say!("tracer: this kernel's hooks: {} (`tracer doctor` says why)", fallbacks.join(", "));
    }
    for (phase, why) in &probes.unavailable {
        say!("tracer: phase {phase} unavailable: {why}");
    }
    // Parsing the kernel's BTF (twice: ours for offsets, aya's for loading) takes tens of
    // megabytes that are free again now; give them back rather than keep them resident.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };

    never_preempt_on_wakeup();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the event loop")?;
    let format: Box<dyn Format> = match args.output {
        OutputFormat::Text => Box::new(Text),
        OutputFormat::Json => Box::new(Json),
    };
    let session = Session {
        format,
        print_connections: args.connections,
        timeline: match labels_on {
            true => Timeline::with_labels(Routes::parse(&args.routes)?),
            false => Timeline::new(),
        },
        stats: Stats {
            unavailable: probes.unavailable.clone(),
            max_labels: MaxLabels(args.max_labels),
            ..Stats::default()
        },
        records: Vec::new(),
        live,
        started: Instant::now(),
        decode_errors: 0,
        listeners: ListenerWatch::new(&args.ports, args.all),
        synacks_pending: BTreeMap::new(),
        marked_ports: process_mode.then_some(listening),
        listener_cgroups: HashSet::new(),
        slow_ns: args.slow.map(|d| d.as_nanos() as u64),
        cgroups,
        cgroup_ids,
    };
    runtime.block_on(trace(args, probes, ring, session, launched.as_mut()))
}

/// The TLS libraries of the traced processes, hooked as they appear (a library loaded
/// later, a process forked later).
struct TlsWatch {
    /// Uprobes on TLS libraries (not skipped).
    uprobes: bool,
    /// The record-layer program (cgroup v2 present).
    records: bool,
    /// PID mode: libraries hooked per process; port mode (every process): under 0.
    hooked: HashMap<u32, HashSet<(u64, u64)>>,
    /// Library names already announced, and failures already said.
    announced: HashSet<String>,
    /// Files (device, inode) read and found without OpenSSL's functions: an executable
    /// is a candidate on every scan, and reading it again each second took its whole
    /// size in memory each time (tens of MB for a debug build).
    without_tls: HashSet<(u64, u64)>,
    last_scan: Option<Instant>,
}

impl TlsWatch {
    /// Scans the traced processes for TLS libraries not hooked yet: often while tracing
    /// is young (a command just started loads its libraries), then every second (every
    /// five in port mode, where every process is looked at).
    fn due(&self, started: Instant, port_mode: bool) -> bool {
        let every = if started.elapsed() < Duration::from_secs(3) {
            Duration::from_millis(100)
        } else if port_mode {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        (self.uprobes || self.records) && self.last_scan.is_none_or(|t| t.elapsed() >= every)
    }

    fn scan(&mut self, probes: &mut Probes, live: &HashSet<u32>, port_mode: bool) {
        self.last_scan = Some(Instant::now());
        let pids: Vec<u32> = if port_mode { procs::all() } else { live.iter().copied().collect() };
        if !port_mode {
            let gone: Vec<u32> = self.hooked.keys().filter(|p| !live.contains(p)).copied().collect();
            for pid in gone {
                self.hooked.remove(&pid);
                probes.unhook_tls(pid);
            }
        }
        if let Some(root) = tls::cgroup2_root().filter(|_| self.records) {
            // The record-layer program, on the cgroups of the traced processes (every
            // process's, in port mode).
            let cgroups: HashSet<PathBuf> = if port_mode {
                HashSet::from([root])
            } else {
                live.iter().filter_map(|&pid| tls::cgroup_of(pid)).collect()
            };
            for cgroup in cgroups {
                if let Err(e) = probes.attach_cgroup(&cgroup) {
                    if self.announced.insert(format!("cgroup {}", cgroup.display())) {
                        say!("tracer: warning: the cgroup programs are not attached to {}: {e:#}", cgroup.display());
                    }
                }
                if let Err(e) = probes.attach_records(&cgroup) {
                    if self.announced.insert(format!("records {}", cgroup.display())) {
                        say!(
                            "tracer: warning: TLS without a library hook is not followed in {}: {e:#}",
                            cgroup.display()
                        );
                    }
                }
            }
        }
        if !self.uprobes {
            return;
        }
        for pid in pids {
            let key = if port_mode { 0 } else { pid };
            let known = self.hooked.entry(key).or_default();
            for lib in tls::libraries(pid, known, &mut self.without_tls) {
                known.insert(lib.id);
                match probes.hook_tls(&lib, (!port_mode).then_some(pid)) {
                    Ok(()) => {
                        info!("TLS: hooked process {pid} ({})", lib.name);
                        if self.announced.insert(lib.name.clone()) {
                            say!("tracer: TLS: OpenSSL uprobes on {}", lib.name);
                        }
                    }
                    Err(e) => {
                        if self.announced.insert(format!("failed {}", lib.name)) {
                            say!(
                                "tracer: warning: TLS connections of {} followed from their records only: {e:#}",
                                lib.name
                            );
                        }
                    }
                }
            }
        }
    }
}

async fn trace(
    args: Args,
    mut probes: Probes,
    ring: RingBuf<MapData>,
    mut session: Session,
    mut launched: Option<&mut Launched>,
) -> Result<i32> {
    let what = if let Some(l) = &launched {
        format!("command {:?} (PID {})", args.command.join(" "), l.pid)
    } else if !session.cgroups.is_empty() {
        let dirs: Vec<String> = session.cgroups.iter().map(|c| c.dir.display().to_string()).collect();
        format!("cgroup(s) {dirs:?} ({} process(es) now)", session.live.len())
    } else if args.all {
        "every process that accepts TCP connections here (--all)".to_owned()
    } else if args.pids.is_empty() {
        format!("port(s) {:?}", args.ports)
    } else {
        format!("{} process(es) from PID(s) {:?}", session.live.len(), args.pids)
    };
    // Stoppable from the moment it says it is tracing: a Ctrl-C or SIGINT sent just
    // after that line must end it with its report, not be lost (a background job of a
    // script inherits SIGINT ignored) or kill it without one.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // The listeners' counters as they are now: listen drops count from here. Their ports
    // are marked now: from here on, only those (and the ones traced processes listen on
    // later) have their connections' setups recorded.
    session.poll_counters(&mut probes);
    if session.marked_ports.is_some() {
        probes.filter_setups()?;
    }
    // `--all` is port mode on every port.
    let port_mode = !args.ports.is_empty() || args.all;
    let mut tls_watch = TlsWatch {
        uprobes: !args.skip_hook_kind.contains(&Kind::UProbe),
        records: tls::cgroup2_root().is_some(),
        hooked: HashMap::new(),
        announced: HashSet::new(),
        without_tls: HashSet::new(),
        last_scan: None,
    };
    tls_watch.scan(&mut probes, &session.live, port_mode);
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let page = metrics::Page::new(args.native_histograms);
            page.update(&session.stats);
            let bound = metrics::serve(addr, page.clone())?;
            say!("tracer: Prometheus metrics at http://{bound}/metrics");
            Some(page)
        }
        None => None,
    };
    say!("tracer: tracing {what}; Ctrl-C to stop");
    info!("attached");
    if let Some(l) = launched.as_mut() {
        l.release()?;
    }
    // Set when the tracer stopped the command itself (at --duration or on SIGTERM).
    let mut stopped_command = false;
    let status = io::stderr().is_terminal();
    // SAFETY: the ring buffer owns its file descriptor and stays registered only while
    // `ring` lives; nothing else closes it.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // The programs do not wake the tracer per event (see `submit_flags`): drain on a
    // timer, and at once when a filling ring buffer wakes it. Each drain starts with its
    // histograms' counters out of the cache and costs a wake-up: 50 ms batches (still
    // under the wake-up threshold of a default ring buffer at 100,000 requests/s) cost
    // per request less than half of what 20 ms ones did.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Interval reports on a fixed schedule from the start, whatever the load.
    let mut reports = args.interval.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let pid_mode = !args.pids.is_empty();
    let reason: String = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut session)?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                drain(ring.get_mut(), &mut session)?;
                session.watch_accepts(&mut probes);
                if tls_watch.due(session.started, port_mode) {
                    tls_watch.scan(&mut probes, &session.live, port_mode);
                }
                // A scrape waits: the statistics of now, with the counters.
                if let Some(page) = metrics.as_ref().filter(|p| p.wanted()) {
                    session.poll_counters(&mut probes);
                    session.stats.state_full = probes.counter(counter::STATE_FULL).unwrap_or(0);
                    page.update(&session.stats);
                }
            }
            _ = sigint.recv() => {
                if let Some(l) = launched.as_mut() {
                    l.stop(libc::SIGINT, Duration::from_secs(5));
                    stopped_command = true;
                }
                break "interrupted".into();
            }
            _ = sigterm.recv() => {
                if let Some(l) = launched.as_mut() {
                    l.stop(libc::SIGTERM, Duration::from_secs(5));
                    stopped_command = true;
                }
                break "terminated".into();
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {
                if let Some(l) = launched.as_mut() {
                    // Let its last events reach the ring buffer with the rest.
                    l.stop(libc::SIGTERM, Duration::from_secs(5));
                    stopped_command = true;
                }
                break "duration reached".into();
            }
            _ = async { reports.as_mut().unwrap().tick().await }, if reports.is_some() => {
                drain(ring.get_mut(), &mut session)?;
                session.poll_counters(&mut probes);
                session.stats.tracked_sockets = probes.tracked_sockets();
                session.report(ReportKind::Interval, &[])?;
            }
            _ = tick.tick() => {
                session.follow_cgroups(&mut probes);
                session.poll_counters(&mut probes);
                if let Some(l) = launched.as_mut() {
                    if let Some(status) = l.try_wait() {
                        break format!("the command exited with status {status}");
                    }
                } else if pid_mode {
                    session.live.retain(|&pid| procs::is_alive(pid));
                    if session.live.is_empty() {
                        break "all traced processes exited".into();
                    }
                }
                if status {
                    say_raw!("{}", session.status_line());
                }
            }
        }
    };
    // From here a second Ctrl-C ends the tracer at once, without the final report.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    if status {
        say_raw!("\r\x1b[K");
    }
    // Events still in the ring buffer belong in the final report, and so do the last
    // exchanges of connections still open.
    drain(ring.get_mut(), &mut session)?;
    for request in probes.in_flight_exchanges() {
        session.apply(Event::Request(request))?;
    }
    session.finish_attribution();
    session.poll_counters(&mut probes);
    session.stats.read_errors = probes.counter(counter::READ_ERRORS).unwrap_or(0);
    session.stats.state_full = probes.counter(counter::STATE_FULL).unwrap_or(0);
    session.stats.tracked_sockets = probes.tracked_sockets();
    say!("tracer: {reason}; detaching");
    let verdicts: Vec<Verdict> =
        args.checks.iter().map(|c| checks::evaluate(c, &session.stats, args.min_samples)).collect();
    session.report(ReportKind::Final, &verdicts)?;
    if let Some(page) = &metrics {
        page.update(&session.stats);
    }
    drop(probes);
    let failed_checks = verdicts.iter().filter(|v| !v.passed).count();
    if failed_checks > 0 {
        say!("tracer: {failed_checks} of {} checks failed", verdicts.len());
    }
    // The command's own failure comes first; a command the tracer stopped did not fail.
    let command_status = match launched {
        Some(l) if !stopped_command => l.try_wait().unwrap_or(0),
        _ => 0,
    };
    Ok(if command_status != 0 {
        command_status
    } else if failed_checks > 0 {
        1
    } else {
        0
    })
}
