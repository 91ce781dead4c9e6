//! Request labels (`--labels`): the first bytes of a request's first read and of its
//! response's first write, on the traced connections only, copied to userspace, which
//! derives the label (method and route, statement kind and table, command name) and keeps
//! nothing else.
//!
//! The bytes are taken from the application's own buffer, found from the system call
//! being made: the read and write hooks run inside `read`/`recvfrom`/`recvmsg`/`readv`
//! (and their write twins), whose arguments are the task's saved user registers
//! (`bpf_task_pt_regs`, 5.15+). That works the same from every hook implementation —
//! tracepoints, trampolines, kprobes — and for a read the data is already in the buffer
//! when the hook runs. On TLS connections hooked in their library the bytes are the
//! plaintext the application hands to it or gets from it (`plain`). Calls made another
//! way (io_uring, sendfile) give no bytes: their requests are unlabelled.

use aya_ebpf::{
    helpers::{
        bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_probe_read_user as probe_read_user_raw, bpf_ringbuf_output, bpf_task_pt_regs,
        },
    },
    macros::map,
    maps::PerCpuArray,
};
use tracer_common::{counter, kind, side, Payload, ShortRequest};

use crate::{
    conn::{finish_request, header, stage_exchange, SockState},
    maps::{bump, submit_flags, CONFIG, EVENTS},
};

/// Whether labels are on (a constant the verifier sees: with labels off the capture is
/// dead code, never verified, so a kernel without `bpf_task_pt_regs` loads the hooks).
#[inline(always)]
pub fn labels() -> bool {
    unsafe { core::ptr::read_volatile(&CONFIG.labels) != 0 }
}

/// The fixed part and the copied bytes, built per CPU (too big for the BPF stack) and
/// output as one variable-length record; before them, the exchange that goes out in
/// the same record when one is staged (`stage_exchange`). The three are contiguous.
#[repr(C)]
pub struct PayloadBuf {
    pub exchange: ShortRequest,
    pub head: Payload,
    pub data: [u8; side::REQUEST_BYTES as usize],
}
const _: () = assert!(
    core::mem::offset_of!(PayloadBuf, head) == size_of::<ShortRequest>()
        && core::mem::offset_of!(PayloadBuf, data) == size_of::<ShortRequest>() + size_of::<Payload>()
);

#[map]
static PAYLOAD: PerCpuArray<PayloadBuf> = PerCpuArray::with_max_entries(1, 0);

/// Where the task's saved user registers (`struct pt_regs`, as saved at system call
/// entry) hold the call's number and its second and third arguments (the first buffer, or
/// the iovec or message, and its length), per architecture. The programs are built for
/// the userspace's architecture (aya-build sets `bpf_target_arch` from it).
#[cfg(bpf_target_arch = "x86_64")]
mod saved {
    /// Where x86_64's `struct pt_regs` holds `dx`, `si` and `orig_ax`.
    const DX_AT: u64 = 12 * 8;
    const SI_AT: u64 = 13 * 8;
    const ORIG_AX_AT: u64 = 15 * 8;

    /// The call's number, its second argument and its third. `regs` is the typed
    /// pointer `bpf_task_pt_regs` returns: read in place, with no helper call.
    #[inline(always)]
    pub fn syscall(regs: u64) -> Option<(u64, u64, u64)> {
        let at = |offset: u64| unsafe { core::ptr::read_volatile((regs + offset) as *const u64) };
        Some((at(ORIG_AX_AT), at(SI_AT), at(DX_AT)))
    }

    // x86_64 system call numbers.
    pub const SYS_READ: u64 = 0;
    pub const SYS_WRITE: u64 = 1;
    pub const SYS_READV: u64 = 19;
    pub const SYS_WRITEV: u64 = 20;
    pub const SYS_SENDTO: u64 = 44;
    pub const SYS_RECVFROM: u64 = 45;
    pub const SYS_SENDMSG: u64 = 46;
    pub const SYS_RECVMSG: u64 = 47;
}

/// arm64's `struct pt_regs`: `regs[31]` (the arguments in x0..x5; x0 is overwritten by
/// the return value only when the call returns), `sp`, `pc`, `pstate`, `orig_x0`, then
/// the call's number `syscallno` (an `s32`) — the same from 5.10 to 6.12.
#[cfg(bpf_target_arch = "aarch64")]
mod saved {
    const X1_AT: u64 = 8;
    const X2_AT: u64 = 16;
    const SYSCALLNO_AT: u64 = 31 * 8 + 4 * 8;

    /// The call's number, its second argument and its third, read in place (see the
    /// x86_64 twin).
    #[inline(always)]
    pub fn syscall(regs: u64) -> Option<(u64, u64, u64)> {
        let nr = unsafe { core::ptr::read_volatile((regs + SYSCALLNO_AT) as *const i32) };
        let arg = |offset: u64| unsafe { core::ptr::read_volatile((regs + offset) as *const u64) };
        Some((nr as u32 as u64, arg(X1_AT), arg(X2_AT)))
    }

    // arm64 system call numbers (the generic table, asm-generic/unistd.h).
    pub const SYS_READ: u64 = 63;
    pub const SYS_WRITE: u64 = 64;
    pub const SYS_READV: u64 = 65;
    pub const SYS_WRITEV: u64 = 66;
    pub const SYS_SENDTO: u64 = 206;
    pub const SYS_RECVFROM: u64 = 207;
    pub const SYS_SENDMSG: u64 = 211;
    pub const SYS_RECVMSG: u64 = 212;
}

/// Other architectures: no call is recognised (the userspace says labels are unavailable
/// there and never turns them on).
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
mod saved {
    #[inline(always)]
    pub fn syscall(_regs: u64) -> Option<(u64, u64, u64)> {
        None
    }
    // Never matched (no call is recognised); distinct, as patterns must be.
    pub const SYS_READ: u64 = u64::MAX;
    pub const SYS_WRITE: u64 = u64::MAX - 1;
    pub const SYS_READV: u64 = u64::MAX - 2;
    pub const SYS_WRITEV: u64 = u64::MAX - 3;
    pub const SYS_SENDTO: u64 = u64::MAX - 4;
    pub const SYS_RECVFROM: u64 = u64::MAX - 5;
    pub const SYS_SENDMSG: u64 = u64::MAX - 6;
    pub const SYS_RECVMSG: u64 = u64::MAX - 7;
}

use saved::*;

#[inline(always)]
fn user_u64(at: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(at as *const u64) }.ok()
}

/// The first buffer of the system call the current task is making, and its length.
#[inline(always)]
fn syscall_buffer() -> Option<(u64, u64)> {
    let task = unsafe { bpf_get_current_task_btf() };
    let regs = unsafe { bpf_task_pt_regs(task) } as u64;
    if regs == 0 {
        return None;
    }
    let (nr, arg1, arg2) = saved::syscall(regs)?;
    let iov = match nr {
        SYS_READ | SYS_WRITE | SYS_RECVFROM | SYS_SENDTO => return Some((arg1, arg2)),
        SYS_READV | SYS_WRITEV => arg1,
        // `struct user_msghdr`: msg_iov after the name and its length.
        SYS_RECVMSG | SYS_SENDMSG => user_u64(arg1 + 16)?,
        _ => return None,
    };
    // The first `struct iovec` (base, length) in one read.
    let first: [u64; 2] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }.ok()?;
    Some((first[0], first[1]))
}

/// Set in a capture's `which` (above the side): an exchange is staged in the buffer,
/// to go out in the same record as the bytes (or alone, when none are copied).
pub const AFTER_EXCHANGE: u32 = 1 << 16;

/// Reports the exchange in progress on `sk` before a request's first bytes are captured:
/// staged in the capture's buffer when it fits a short record (the capture's `which`
/// then takes [`AFTER_EXCHANGE`]), else emitted at once. Whether it was staged.
#[inline(always)]
pub fn stage_before_capture(sk: u64, st: &mut SockState, ts: u64) -> bool {
    match PAYLOAD.get_ptr_mut(0) {
        Some(buf) => stage_exchange(sk, st, ts, unsafe { &raw mut (*buf).exchange }),
        None => {
            finish_request(sk, st, ts, 0);
            false
        }
    }
}

/// Copies the first bytes of what the current call reads or writes on `sk` (`done`: the
/// bytes a read returned, or the length of a write about to start; `plain`: where they
/// are, 0 for the system call's buffer) and sends them to userspace as a [`Payload`] of
/// side `which` (its low 16 bits) — after the staged exchange, in one record, when
/// `which` has [`AFTER_EXCHANGE`]; that exchange goes out alone if no bytes are copied.
// A subprogram of its own: the hooks' stack frames do not grow by its locals.
#[inline(never)]
pub fn capture(sk: u64, owner: u32, which: u32, done: u64, plain: u64) {
    let Some(buf) = PAYLOAD.get_ptr_mut(0) else { return };
    let buf = unsafe { &mut *buf };
    let n = copy(buf, sk, owner, which as u16, done, plain);
    let map = core::ptr::addr_of!(EVENTS) as *mut core::ffi::c_void;
    let (at, size) = if which & AFTER_EXCHANGE == 0 {
        if n == 0 {
            return;
        }
        ((&raw mut buf.head).cast::<core::ffi::c_void>(), size_of::<Payload>() as u64 + n)
    } else {
        let (kind, bytes) = if n == 0 {
            (kind::REQUEST_SHORT, 0)
        } else {
            (kind::REQUEST_SHORT_PAYLOAD, size_of::<Payload>() as u64 + n)
        };
        buf.exchange.kind = kind;
        ((&raw mut buf.exchange).cast(), size_of::<ShortRequest>() as u64 + bytes)
    };
    if unsafe { bpf_ringbuf_output(map, at, size, submit_flags()) } != 0 {
        bump(counter::LOST_EVENTS);
        if which & AFTER_EXCHANGE != 0 && n != 0 {
            // Two events in the record.
            bump(counter::LOST_EVENTS);
        }
    }
}

/// The bytes of [`capture`] copied into `buf` with their fixed part: how many (at most
/// [`side::REQUEST_BYTES`]), 0 when none.
#[inline(always)]
fn copy(buf: &mut PayloadBuf, sk: u64, owner: u32, which: u16, done: u64, plain: u64) -> u64 {
    let Some((at, len)) = (if plain != 0 { Some((plain, done)) } else { syscall_buffer() }) else { return 0 };
    let total = if done < len { done } else { len };
    let limit = if side::is_request(which) { side::REQUEST_BYTES } else { side::RESPONSE_BYTES } as u64;
    let mut n = if total < limit { total } else { limit };
    if n == 0 {
        return 0;
    }
    // Bounds the verifier can see, whatever the compiler made of the comparisons above.
    n &= (side::REQUEST_BYTES as u64 * 2) - 1;
    if n > side::REQUEST_BYTES as u64 {
        return 0;
    }
    if unsafe { probe_read_user_raw(buf.data.as_mut_ptr().cast(), n as u32, at as *const _) } != 0 {
        return 0;
    }
    buf.head = Payload {
        header: header(kind::PAYLOAD, owner, sk, 0),
        side: which,
        len: n as u16,
        total: if total > u32::MAX as u64 { u32::MAX } else { total as u32 },
    };
    n
}
