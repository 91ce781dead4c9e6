//! A server connection's setup record (its handshake, then its accept wait) starts at the
//! state change SYN_RECV → ESTABLISHED, which the kernel makes in a softirq.
//!
//! The kernel runs a tracepoint program at most once at a time on a CPU: when a softirq
//! interrupts the state hook while it runs in process context for another socket (a
//! connect, a close), the state changes inside that softirq are not given to the hook
//! at all, and the program's `recursion_misses` is all that counts them. So this change
//! has a second program of its own on the same tracepoint, which does nothing else. The
//! tracepoint calls the two one after the other, so an interrupted context is inside at
//! most one of them and the other runs; the first to run records the setup, the second
//! finds it there.
//!
//! What is missed all the same (a full socket table, or any other way) is counted when
//! a traced process accepts the connection: accepted with no record although the kernel
//! created it after the programs were attached (`counter::MISSED_SETUPS`).
//!
//! Where the kernel runs socket-operation programs on cgroups (5.10+, cgroup v2), the
//! second program is one of those instead (`sockops`): attached to the cgroups of the
//! traced processes and of their listeners, it is told of each passive connection
//! those listeners establish, just before the state change (a cgroup program is never
//! skipped), and for no other socket. The state hook then finds the setup recorded; it
//! records those of listeners in cgroups not (yet) attached. The twin on the
//! tracepoint, which ran for every state change of every socket on the machine, is then
//! not attached. Where that program takes every state change of the traced connections
//! (`sockops`), the state tracepoint is not attached either: the program is the only
//! one told of a setup, and a listener's cgroup not attached yet has its setups
//! recorded from the moment it is.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_jiffies64},
    macros::map,
    maps::{Array, PerCpuArray},
};
use tracer_common::counter;

use crate::{
    kernel::{is_inet_tcp, read},
    maps::{bump, filter_by_port, is_traced_port, is_traced_tgid, mark_state_port},
    off,
    state::{on_passive_established, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_SYN_RECV},
};

/// The jiffies (64-bit) when the state hook first saw a socket start listening
/// (userspace makes one as soon as the programs are attached: `Probes::note_attached`):
/// from then on, every passive connection the kernel establishes is given to one of the
/// two programs.
#[map]
static ATTACHED_JIFFIES: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU, the connection whose setup the first of the two programs has just handled
/// (recorded, or found no room for), until the second takes it. The two run one after
/// the other on the same CPU, with no other state change in between but in a softirq
/// that interrupts them.
#[map]
static JUST_HANDLED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Whether the other program has just handled the setup of `sk`, in this same state
/// change; takes the mark. (A mark the second program never took, because the kernel
/// skipped it, is taken by the next state change of the same socket address on the CPU,
/// whose setup the second program then records.)
#[inline(always)]
pub fn handled_just_now(sk: u64) -> bool {
    let Some(mark) = JUST_HANDLED.get_ptr_mut(0) else { return false };
    if unsafe { *mark } != sk {
        return false;
    }
    unsafe { *mark = 0 };
    true
}

#[inline(always)]
pub fn note_handled(sk: u64) {
    if let Some(mark) = JUST_HANDLED.get_ptr_mut(0) {
        unsafe { *mark = sk };
    }
}

tracepoint_hook! {
    /// SYN_RECV → ESTABLISHED again, for when the state hook itself was skipped.
    fn setup_state_change / raw_setup_state_change (ctx) {
        let old: i32 = ctx.arg(1);
        let new: i32 = ctx.arg(2);
        if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
            on_passive_established::<BTF, true>(ctx.arg(0));
        }
        0
    }
}

/// The state hook saw a socket start listening, or the iterator that flags the open
/// connections ran (`sockops`): the first time, the jiffy is noted (see
/// [`ATTACHED_JIFFIES`]).
#[inline(always)]
pub fn note_running() {
    if let Some(first) = ATTACHED_JIFFIES.get_ptr_mut(0) {
        if unsafe { *first } == 0 {
            unsafe { *first = bpf_jiffies64() };
        }
    }
}

/// accept() returned `sk`, of which there is no state: counted as a missed setup when it
/// is a still open TCP connection of a traced process (or port) that the kernel created
/// after the programs were attached. (One created before is a connection that was
/// already waiting to be accepted when tracing started: adopted on its first read, as
/// the README says.)
#[inline(always)]
pub fn accepted_without_state(sk: u64) {
    let Some(attached) = ATTACHED_JIFFIES.get(0).copied() else { return };
    if attached == 0 || !is_inet_tcp(sk) {
        return;
    }
    if filter_by_port() {
        if !is_traced_port(read::<u16>(sk, off!(skc_num)).unwrap_or(0)) {
            return;
        }
    } else if !is_traced_tgid((bpf_get_current_pid_tgid() >> 32) as u32) {
        return;
    } else {
        // A traced process accepts on a port not marked (a listener it got from another
        // process, which userspace has not seen yet): the next setups there are recorded.
        mark_state_port(read::<u16>(sk, off!(skc_num)).unwrap_or(0));
    }
    // A connection reset while it waited in the queue has closed, its state with it.
    let state = read::<u8>(sk, off!(skc_state)).unwrap_or(0) as i32;
    if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
        return;
    }
    // lsndtime holds the jiffy the kernel created the connection until the application
    // first sends, which it cannot have done before accept() returned. Created in the
    // jiffy the programs were attached, it may have come before them: not counted.
    let Some(created) = read::<u32>(sk, off!(tcp_lsndtime)) else { return };
    let now = unsafe { bpf_jiffies64() };
    let created = now.saturating_sub((now as u32).wrapping_sub(created) as u64);
    if created > attached {
        bump(counter::MISSED_SETUPS);
    }
}
