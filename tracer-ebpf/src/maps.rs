//! Maps and globals shared by every program.

use aya_ebpf::{
    helpers::generated::{bpf_ringbuf_reserve, bpf_ringbuf_submit},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
pub use tracer_common::TupleKey;
use tracer_common::{counter, record_bytes, KernelOffsets, ProgramConfig, RecordState, ThreadWork, TlsCall};

use crate::conn::SockState;

/// Kernel struct offsets, resolved from BTF by userspace before load.
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = KernelOffsets {
    skc_family: 0,
    skc_num: 0,
    skc_dport: 0,
    skc_rcv_saddr: 0,
    skc_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_v6_daddr: 0,
    sk_protocol: 0,
    sk_type: 0,
    tcp_srtt_us: 0,
    tcp_snd_una: 0,
    tcp_write_seq: 0,
    treq_snt_synack: 0,
    skb_cb: 0,
    tcp_skb_cb_ack_seq: 0,
    task_pid: 0,
    task_tgid: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    fdtable_max_fds: 0,
    file_private_data: 0,
    socket_sk: 0,
    sk_err: 0,
    tcp_total_retrans: 0,
    tcp_bytes_sent: 0,
    tcp_bytes_retrans: 0,
    tcp_skb_cb_seq: 0,
    skc_state: 0,
    tcp_lsndtime: 0,
    tcp_rcv_nxt: 0,
    tcp_copied_seq: 0,
    msghdr_iter: 0,
    iov_iter_type: 0,
    iov_iter_offset: 0,
    iov_iter_ptr: 0,
    iter_ubuf: 0,
    iter_iovec: 0,
    iter_type_mask: 0,
    iov_iter_count: 0,
    skc_net: 0,
    net_ns_inum: 0,
    inet_sport: 0,
};

#[unsafe(no_mangle)]
pub static CONFIG: ProgramConfig = ProgramConfig {
    filter_by_port: 0,
    drop_reason_listen_overflow: u32::MAX,
    wakeup_bytes: 0,
    tls_hooks: 0,
    tls_records: 0,
    labels: 0,
    filter_by_cgroup: 0,
    all_ports: 0,
    task_btf: 0,
};

/// One field of `OFFSETS`. Volatile, so the compiler cannot fold the zero initialiser
/// into the code: the loader rewrites the value before the program is verified.
#[macro_export]
macro_rules! off {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&$crate::maps::OFFSETS.$field) }
    };
}

#[inline(always)]
pub fn drop_reason_listen_overflow() -> u32 {
    unsafe { core::ptr::read_volatile(&CONFIG.drop_reason_listen_overflow) }
}

#[inline(always)]
pub fn filter_by_port() -> bool {
    unsafe { core::ptr::read_volatile(&CONFIG.filter_by_port) != 0 }
}

/// Whether uprobes on a TLS library may be attached (see `tls`).
#[inline(always)]
pub fn tls_hooks() -> bool {
    let configured = unsafe { core::ptr::read_volatile(&CONFIG.tls_hooks) } != 0;
    configured && TLS_HOOKED.get(0).is_some_and(|v| *v != 0)
}

/// Set by userspace once uprobes are on a TLS library of a traced process: until then
/// (a plain-TCP server) the socket hooks do not look for the thread's library calls.
#[map]
pub static TLS_HOOKED: Array<u32> = Array::with_max_entries(1, 0);

/// Whether the record-layer program is attached (see `records`).
#[inline(always)]
pub fn tls_records() -> bool {
    unsafe { core::ptr::read_volatile(&CONFIG.tls_records) != 0 }
}

/// Events to userspace. Sized by the loader (`--ring-buffer-size`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Flags for submitting an event. Waking the reader per event costs an interrupt (a VM
/// exit on virtual machines) per request, so events are submitted silently and userspace
/// drains the ring on a short timer; only a ring filling up (`wakeup_bytes`, a quarter
/// of it) wakes it at once.
#[inline(always)]
pub fn submit_flags() -> u64 {
    let wakeup = unsafe { core::ptr::read_volatile(&CONFIG.wakeup_bytes) } as u64;
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= wakeup {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// An event being written in place in the ring buffer; submitted with [`Slot::submit`].
/// (Dropping one unsubmitted fails verification: every path submits.)
pub struct Slot<T>(*mut T);

impl<T> Slot<T> {
    #[inline(always)]
    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.0
    }

    #[inline(always)]
    pub fn write(&mut self, value: T) {
        unsafe { self.0.write(value) }
    }

    #[inline(always)]
    pub fn submit(self) {
        unsafe { bpf_ringbuf_submit(self.0.cast(), submit_flags()) }
    }
}

/// Room for one event, or `None` (counted as lost) when the ring is full.
#[inline(always)]
pub fn reserve<T>() -> Option<Slot<T>> {
    let map = core::ptr::addr_of!(EVENTS) as *mut core::ffi::c_void;
    let ptr = unsafe { bpf_ringbuf_reserve(map, record_bytes(size_of::<T>()) as u64, 0) };
    if ptr.is_null() {
        bump(counter::LOST_EVENTS);
        return None;
    }
    Some(Slot(ptr.cast()))
}

/// Traced thread groups (tgid → 1). Filled by userspace, extended on fork.
#[map]
pub static PIDS: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

/// Traced listening ports (port → 1) in `--port` mode.
#[map]
pub static PORTS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// Per-connection state, keyed by the `struct sock` address. Sized by the loader.
#[map]
pub static SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, 0);

/// First SYN-ACK time and retransmit count of handshakes that needed a retransmit,
/// keyed by the connection's tuple until the connection is established.
#[map]
pub static SYNACKS: HashMap<TupleKey, SynAckInfo> = HashMap::with_max_entries(8192, 0);

/// Traced server connections that just closed (by sock address), so that a reset the
/// kernel sends right after closing (unread data, SO_LINGER 0) is still attributed.
#[map]
pub static RECENTLY_CLOSED: LruHashMap<u64, ClosedConn> = LruHashMap::with_max_entries(4096, 0);

/// Handshake-completing ACKs each listener dropped because its accept queue was full,
/// keyed by the listener's socket cookie. The kernel counts such a drop twice in the
/// listener's drop counter and once in ListenDrops; userspace uses this to tell them apart.
#[map]
pub static ACK_OVERFLOWS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// Per thread of the traced processes, the server request it works for (see `bind`).
/// Least recently used threads make room for new ones.
#[map]
pub static THREADS: LruHashMap<u32, ThreadWork> = LruHashMap::with_max_entries(65536, 0);

/// Per thread inside a hooked call of the TLS library, that call (see `tls`). Least
/// recently used entries make room: a thread that dies inside a call leaves one behind.
#[map]
pub static TLS_CALLS: LruHashMap<u32, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// How many entries `TLS_CALLS` has been given and not had taken back by their call's
/// return: while it is 0 no thread is inside a hooked call, and a socket call needs no
/// lookup (a plain-HTTP server that links the library makes three per request). An
/// entry replaced or evicted before its return leaves it above the truth, never below:
/// the lookups are then made, as before.
#[map]
static TLS_CALLS_OPEN: Array<u64> = Array::with_max_entries(1, 0);

/// A thread entered a hooked call (`true`) or returned from one (`false`); see
/// [`TLS_CALLS_OPEN`].
#[inline(always)]
pub fn note_tls_call(entered: bool) {
    step_count(&TLS_CALLS_OPEN, entered);
}

/// Whether some thread may be inside a hooked call of the TLS library.
#[inline(always)]
pub fn tls_calls_open() -> bool {
    count_nonzero(&TLS_CALLS_OPEN)
}

/// Adds one to the count in `count`'s only entry (`up`), or takes one from it.
#[inline(always)]
fn step_count(count: &Array<u64>, up: bool) {
    if let Some(n) = count.get_ptr_mut(0) {
        let step = if up { 1 } else { u64::MAX };
        // Atomic: steps on two CPUs at once must both count (adding u64::MAX wraps to -1).
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(n, step) };
    }
}

#[inline(always)]
fn count_nonzero(count: &Array<u64>) -> bool {
    count.get(0).is_some_and(|n| unsafe { core::ptr::read_volatile(n) } != 0)
}

/// Connects of the traced processes under way (a state made at SYN_SENT, not yet
/// established or closed): while there are none, the state hook does not look up the
/// sockets that become established from SYN_SENT (the machine's other clients). A
/// connect's end that is missed leaves the count above the truth, never below: the
/// lookups are then made, as before.
#[map]
static CONNECTS_OPEN: Array<u64> = Array::with_max_entries(1, 0);

/// A traced connect began (`true`: its state is made) or ended.
#[inline(always)]
pub fn note_connect(began: bool) {
    step_count(&CONNECTS_OPEN, began);
}

/// Whether a traced process may have a connect under way.
#[inline(always)]
pub fn connects_open() -> bool {
    count_nonzero(&CONNECTS_OPEN)
}

/// The socket under each TLS connection object (`SSL *` → `struct sock *`), learnt from
/// the socket calls made inside the library's calls.
#[map]
pub static TLS_SOCKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// Per thread, the connection followed from its TLS records that it read last (see
/// `tls::adopt`).
#[map]
pub static LAST_RECORDS_READ: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Server connections followed from their TLS records, by socket, until the client's
/// handshake has been read (see `records`).
#[map]
pub static RECORDS: LruHashMap<u64, RecordState> = LruHashMap::with_max_entries(16384, 0);

/// A set of local ports, a byte per port (eight to an entry): a hook that runs for every
/// segment the machine receives tests a socket's port with an array read before it
/// looks the socket up. A byte store marks a port without racing a mark of its
/// neighbours; marks are never cleared (a port marked in vain costs a lookup).
type PortMarks = Array<[u8; 8]>;

/// Marks `port` in `marks` (stored only when unmarked: the line stays shared).
#[inline(always)]
fn mark_port(marks: &PortMarks, port: u16) {
    if let Some(bytes) = marks.get_ptr_mut((port >> 3) as u32) {
        let byte = unsafe { &raw mut (*bytes)[(port & 7) as usize] };
        if unsafe { core::ptr::read_volatile(byte) } == 0 {
            unsafe { core::ptr::write_volatile(byte, 1) };
        }
    }
}

#[inline(always)]
fn port_marked(marks: &PortMarks, port: u16) -> bool {
    marks.get((port >> 3) as u32).is_some_and(|bytes| bytes[(port & 7) as usize] != 0)
}

/// The local ports of every connection ever followed from its records: the record-layer
/// program looks a segment's socket up only when its port is marked.
#[map]
pub static RECORD_PORTS: PortMarks = Array::with_max_entries(8192, 0);

/// Marks the local port of `sk` (about to be followed from its records).
#[inline(always)]
pub fn mark_record_port(sk: u64) {
    mark_port(&RECORD_PORTS, crate::kernel::read::<u16>(sk, crate::off!(skc_num)).unwrap_or(0));
}

/// Whether a connection on local port `port` may be followed from its records.
#[inline(always)]
pub fn record_port_marked(port: u16) -> bool {
    port_marked(&RECORD_PORTS, port)
}

/// The local ports of connections that may have a state: every state's port (marked as
/// it is created, a connecting socket's once established), and in process mode the
/// ports the traced processes begin listening on while traced, or accept on with no
/// state (those userspace finds are in `LISTENER_PORTS`). The programs alone write it,
/// a byte at a time. The hooks that run for every segment or state change of the machine
/// look a socket's state up only when its port is marked: the other end of a
/// connection on the same machine (a load generator's ephemeral port) and the servers
/// not traced cost one array read.
#[map]
pub static STATE_PORTS: PortMarks = Array::with_max_entries(8192, 0);

/// `port` may carry traced connections from now on.
#[inline(always)]
pub fn mark_state_port(port: u16) {
    if port != 0 {
        mark_port(&STATE_PORTS, port);
    }
}

/// Whether a socket on local port `port` may be traced.
#[inline(always)]
pub fn state_port_marked(port: u16) -> bool {
    port_marked(&STATE_PORTS, port)
}

/// Non-zero (set by userspace in process and cgroup mode, once it has marked the ports
/// the traced processes listen on): a passive connection gets a state only on a marked
/// port, so that the servers not traced cost the state hook no map work. Until then,
/// every passive connection gets one, as in port mode every connection on a traced port.
#[map]
static SETUP_FILTER: Array<u32> = Array::with_max_entries(1, 0);

/// The ports the traced processes listened on as tracing started, and those userspace
/// finds later, marked by userspace alone: it writes an entry (eight ports) whole, so
/// sharing one with the programs' byte stores could undo one of theirs.
#[map]
static LISTENER_PORTS: PortMarks = Array::with_max_entries(8192, 0);

/// Whether the setup of a passive connection on local port `port` is to be recorded:
/// its port may be traced (the filter on), or any (not yet).
#[inline(always)]
pub fn setup_wanted(port: u16) -> bool {
    if SETUP_FILTER.get(0).is_none_or(|on| *on == 0) || state_port_marked(port) || port_marked(&LISTENER_PORTS, port) {
        return true;
    }
    // Its listener may be a traced one whose port was picked after it began listening.
    mark_pending_listeners() && state_port_marked(port)
}

/// Listeners of traced processes that had no port yet as they began listening (the
/// kernel picks it just after): their ports are marked at the next setup on a port not
/// marked. A few at a time; a listener that finds no room is marked at its first accept.
#[map]
static PENDING_LISTENERS: Array<u64> = Array::with_max_entries(PENDING_KEPT, 0);
const PENDING_KEPT: u32 = 4;

/// Keeps `sk`, a traced process's listener whose port is not known yet.
#[inline(always)]
pub fn note_pending_listener(sk: u64) {
    for i in 0..PENDING_KEPT {
        if let Some(slot) = PENDING_LISTENERS.get_ptr_mut(i) {
            if unsafe { *slot } == 0 {
                unsafe { *slot = sk };
                return;
            }
        }
    }
}

/// Marks the ports the pending listeners have by now; whether any was marked.
#[inline(always)]
fn mark_pending_listeners() -> bool {
    let mut marked = false;
    for i in 0..PENDING_KEPT {
        let Some(slot) = PENDING_LISTENERS.get_ptr_mut(i) else { continue };
        let sk = unsafe { *slot };
        if sk == 0 {
            continue;
        }
        let port = crate::kernel::read::<u16>(sk, crate::off!(skc_num)).unwrap_or(0);
        if port != 0 {
            mark_state_port(port);
            unsafe { *slot = 0 };
            marked = true;
        }
    }
    marked
}

/// Upstream connections the traced processes had open when tracing started, by tuple:
/// filled by userspace from /proc, consumed when the connection is first used.
#[map]
pub static EXISTING_CLIENTS: HashMap<TupleKey, u32> = HashMap::with_max_entries(16384, 0);

/// A per-CPU place to build a new connection's state before inserting it: on the stack
/// it would take 144 of the 512 bytes a hook and its callees may use.
#[map]
pub static NEW_STATE: PerCpuArray<SockState> = PerCpuArray::with_max_entries(1, 0);

/// When (CLOCK_MONOTONIC ns) every hook was in place, accept's among them: written by
/// userspace once, 0 before. An accept not seen of a connection established later is
/// one the accept hook cannot see (`accept::adopt_unseen`).
#[map]
pub static HOOKED_NS: Array<u64> = Array::with_max_entries(1, 0);

/// Per-CPU counters (see `tracer_common::counter`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClosedConn {
    pub owner: u32,
    pub local_port: u16,
    /// The peer's port as the socket keeps it (network order): a reset from another
    /// socket allocated at the same address since (another connection) is not this one's.
    pub remote_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SynAckInfo {
    pub first_synack_ns: u64,
    pub retransmits: u32,
    pub _pad: u32,
}

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

/// Inserts into `PIDS` so far, by the programs (0) and by userspace (1): any change
/// invalidates what `UNTRACED` remembers.
#[map]
pub static PIDS_GEN: Array<u64> = Array::with_max_entries(2, 0);

/// Per CPU, the last few thread groups found not traced and the `PIDS_GEN` sum then.
/// The busy untraced processes of the machine (a benchmark's load generator, a server
/// that is not traced beside one that is) ask about the same few thread groups on
/// every send and receive: an array read answers instead of a hash lookup. Only "not
/// traced" is remembered, so a thread group that exits (and leaves `PIDS`) is never
/// wrongly taken for traced.
#[map]
pub static UNTRACED: PerCpuArray<UntracedMemo> = PerCpuArray::with_max_entries(1, 0);

/// Thread groups remembered per CPU: a traced server's clients and untraced servers
/// alternate on a CPU, one entry would be taken by each in turn.
const UNTRACED_KEPT: usize = 4;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UntracedMemo {
    /// 0: empty (thread group 0, the idle task, is never traced anyway).
    pub tgids: [u32; UNTRACED_KEPT],
    pub generation: u64,
    /// The entry the next one takes (round robin).
    pub next: u32,
    pub _pad: u32,
}

#[inline(always)]
fn pids_generation() -> u64 {
    let by_programs = PIDS_GEN.get(0).copied().unwrap_or(0);
    let by_userspace = PIDS_GEN.get(1).copied().unwrap_or(0);
    by_programs.wrapping_add(by_userspace)
}

#[inline(always)]
fn remembered_untraced(tgid: u32, generation: u64) -> bool {
    UNTRACED.get(0).is_some_and(|m| {
        m.generation == generation
            && (m.tgids[0] == tgid || m.tgids[1] == tgid || m.tgids[2] == tgid || m.tgids[3] == tgid)
    })
}

/// Whether this CPU remembers `tgid` as not traced (no hash lookup: a cheap first test;
/// `false` says nothing).
#[inline(always)]
pub fn known_untraced(tgid: u32) -> bool {
    remembered_untraced(tgid, pids_generation())
}

/// Traced cgroups (v2 id → 1) with `--cgroup`, filled by userspace (each with its
/// descendants).
#[map]
pub static CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

#[inline(always)]
fn filter_by_cgroup() -> bool {
    unsafe { core::ptr::read_volatile(&CONFIG.filter_by_cgroup) != 0 }
}

/// With `--cgroup`: whether `tgid` is traced — known, or the calling process itself
/// running in a traced cgroup now (a process started there, or moved there, after
/// tracing began), which makes it known.
#[inline(always)]
fn traced_by_cgroup(tgid: u32) -> bool {
    if PIDS.get_ptr(tgid).is_some() {
        return true;
    }
    if (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32 != tgid {
        return false;
    }
    let id = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    if CGROUPS.get_ptr(&id).is_none() {
        return false;
    }
    trace_tgid(tgid);
    true
}

#[inline(always)]
pub fn is_traced_tgid(tgid: u32) -> bool {
    if filter_by_cgroup() {
        // No memory of untraced processes here: a process moved into a traced cgroup
        // is traced from its next accept or connect.
        return traced_by_cgroup(tgid);
    }
    // Read before the lookup: an insert racing with it bumps the generation after, so
    // a miss remembered here is forgotten at once.
    let generation = pids_generation();
    if remembered_untraced(tgid, generation) {
        return false;
    }
    if PIDS.get_ptr(tgid).is_some() {
        return true;
    }
    if let Some(m) = UNTRACED.get_ptr_mut(0) {
        let m = unsafe { &mut *m };
        if m.generation != generation {
            // What it remembered may be traced now.
            m.tgids = [0; UNTRACED_KEPT];
            m.generation = generation;
        }
        m.tgids[(m.next as usize) % UNTRACED_KEPT] = tgid;
        m.next = m.next.wrapping_add(1);
    }
    false
}

/// Adds `tgid` to the traced thread groups (after which the per-CPU memories of
/// untraced ones are stale).
#[inline(always)]
pub fn trace_tgid(tgid: u32) {
    let _ = PIDS.insert(&tgid, &1, 0);
    if let Some(count) = PIDS_GEN.get_ptr_mut(0) {
        // Atomic: forks on two CPUs at once must both change it.
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(count, 1) };
    }
}

#[inline(always)]
pub fn is_traced_port(port: u16) -> bool {
    let all = unsafe { core::ptr::read_volatile(&CONFIG.all_ports) != 0 };
    all || PORTS.get_ptr(port as u32).is_some()
}
