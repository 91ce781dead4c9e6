//! Fork and exit of traced processes: children of a traced process are traced from
//! their first instruction; userspace learns when a traced process is gone.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use tracer_common::{kind, EventHeader, ProcessEvent};

use crate::{
    conn::now,
    kernel::read,
    maps::{is_traced_tgid, reserve, trace_tgid, PIDS},
    off,
};

tracepoint_hook! {
    fn sched_process_fork / raw_sched_process_fork (ctx) {
        let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if !is_traced_tgid(parent_tgid) {
            return 0;
        }
        let child: u64 = ctx.arg(1);
        // One read after the other: reading both in a tuple pattern made older verifiers
        // (6.1) reject the program over a register the compiler left unset on one path.
        let Some(pid) = read::<u32>(child, off!(task_pid)) else { return 0 };
        let Some(tgid) = read::<u32>(child, off!(task_tgid)) else { return 0 };
        if pid != tgid {
            return 0; // a new thread of a traced process: already covered by its tgid
        }
        trace_tgid(tgid);
        emit(kind::PROCESS_FORK, parent_tgid, tgid);
        0
    }
}

tracepoint_hook! {
    fn sched_process_exit / raw_sched_process_exit (_ctx) {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        // The thread-group leader exits last in the common case; its exit ends the process.
        if tgid != pid_tgid as u32 || !is_traced_tgid(tgid) {
            return 0;
        }
        let _ = PIDS.remove(&tgid);
        emit(kind::PROCESS_EXIT, tgid, 0);
        0
    }
}

#[inline(always)]
fn emit(event_kind: u16, tgid: u32, child: u32) {
    if let Some(mut slot) = reserve::<ProcessEvent>() {
        slot.write(ProcessEvent {
            header: EventHeader { kind: event_kind, tgid, ts_ns: now(), ..EventHeader::default() },
            child,
            _pad: 0,
        });
        slot.submit();
    }
}
