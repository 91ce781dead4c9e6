//! The kernel struct offsets the programs need, resolved from the running kernel's BTF.

use anyhow::{ensure, Context as _, Result};
use tracer_common::KernelOffsets;

use crate::btf::Btf;

/// Resolves every offset in [`KernelOffsets`]; the error names the field that is missing.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let byte = |strukt: &str, path: &str, size: u32| -> Result<u32> {
        let loc = btf.field(strukt, path)?;
        ensure!(
            loc.bitfield_size == 0 && (size == 0 || loc.size == size),
            "{strukt}.{path} has an unexpected layout on this kernel ({loc:?}, expected {size} bytes)"
        );
        Ok(loc.byte_offset)
    };
    let sock_common = btf.field("sock", "__sk_common")?.byte_offset;
    ensure!(sock_common == 0, "struct sock does not start with struct sock_common");
    let offsets = KernelOffsets {
        skc_family: byte("sock_common", "skc_family", 2)?,
        skc_num: byte("sock_common", "skc_num", 2)?,
        skc_dport: byte("sock_common", "skc_dport", 2)?,
        skc_rcv_saddr: byte("sock_common", "skc_rcv_saddr", 4)?,
        skc_daddr: byte("sock_common", "skc_daddr", 4)?,
        skc_v6_rcv_saddr: byte("sock_common", "skc_v6_rcv_saddr", 16)?,
        skc_v6_daddr: byte("sock_common", "skc_v6_daddr", 16)?,
        sk_protocol: byte("sock", "sk_protocol", 2)?,
        sk_type: byte("sock", "sk_type", 2)?,
        tcp_srtt_us: byte("tcp_sock", "srtt_us", 4)?,
        tcp_snd_una: byte("tcp_sock", "snd_una", 4)?,
        tcp_write_seq: byte("tcp_sock", "write_seq", 4)?,
        treq_snt_synack: byte("tcp_request_sock", "snt_synack", 8)?,
        skb_cb: byte("sk_buff", "cb", 0)?,
        tcp_skb_cb_ack_seq: byte("tcp_skb_cb", "ack_seq", 4)?,
        task_pid: byte("task_struct", "pid", 4)?,
        task_tgid: byte("task_struct", "tgid", 4)?,
        task_files: byte("task_struct", "files", 8)?,
        files_fdt: byte("files_struct", "fdt", 8)?,
        fdtable_fd: byte("fdtable", "fd", 8)?,
        fdtable_max_fds: byte("fdtable", "max_fds", 4)?,
        file_private_data: byte("file", "private_data", 8)?,
        socket_sk: byte("socket", "sk", 8)?,
        sk_err: byte("sock", "sk_err", 4)?,
        tcp_total_retrans: byte("tcp_sock", "total_retrans", 4)?,
        tcp_bytes_sent: byte("tcp_sock", "bytes_sent", 8)?,
        tcp_bytes_retrans: byte("tcp_sock", "bytes_retrans", 8)?,
        tcp_skb_cb_seq: {
            let seq = byte("tcp_skb_cb", "seq", 4)?;
            let end_seq = byte("tcp_skb_cb", "end_seq", 4)?;
            // The programs read both in one 8-byte read.
            ensure!(
                end_seq == seq + 4,
                "tcp_skb_cb.end_seq does not follow .seq on this kernel (offsets {seq}, {end_seq})"
            );
            seq
        },
        skc_state: byte("sock_common", "skc_state", 1)?,
        tcp_lsndtime: byte("tcp_sock", "lsndtime", 4)?,
        tcp_rcv_nxt: byte("tcp_sock", "rcv_nxt", 4)?,
        tcp_copied_seq: byte("tcp_sock", "copied_seq", 4)?,
        msghdr_iter: byte("msghdr", "msg_iter", 0)?,
        // 6.0 and later: `u8 iter_type`; before: `unsigned int type` with the direction in
        // its lowest bit (read as one byte: the values fit).
        iov_iter_type: btf.field("iov_iter", "iter_type").or_else(|_| btf.field("iov_iter", "type"))?.byte_offset,
        iov_iter_offset: byte("iov_iter", "iov_offset", 8)?,
        iov_iter_ptr: btf.field("iov_iter", "ubuf").or_else(|_| btf.field("iov_iter", "iov"))?.byte_offset,
        iter_ubuf: btf.enumerator("ITER_UBUF").map_or(u32::MAX, |v| v as u32),
        iter_iovec: btf.enumerator("ITER_IOVEC").context("enum iter_type has no ITER_IOVEC")? as u32,
        iter_type_mask: if btf.field("iov_iter", "iter_type").is_ok() { 0xff } else { 0xfe },
        iov_iter_count: byte("iov_iter", "count", 8)?,
        // `possible_net_t`: a struct holding the pointer (kernels built without network
        // namespaces have no pointer: there is one namespace, and no BTF field either).
        skc_net: byte("sock_common", "skc_net", 8)?,
        net_ns_inum: byte("net", "ns.inum", 4)?,
        inet_sport: byte("inet_sock", "inet_sport", 2)?,
    };
    Ok(offsets)
}

/// What the programs need to know about the running kernel.
pub struct KernelFacts {
    pub offsets: KernelOffsets,
    /// `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`, when the kernel has it.
    pub drop_reason_listen_overflow: Option<u32>,
    /// Which argument of `tcp_recvmsg` holds the flags (for its kprobe): kernels before
    /// 5.19 pass `nonblock` before them.
    pub recvmsg_flags_arg: u32,
    /// Why request labels cannot be read here (`None`: they can). The programs find a
    /// call's buffer in the task's saved user registers (`bpf_task_pt_regs`, 5.15+),
    /// laid out as on x86_64 or aarch64.
    pub labels_unavailable: Option<&'static str>,
    /// Whether the kernel has `bpf_get_current_task_btf` (5.11+).
    pub task_btf: bool,
}

pub fn from_running_kernel() -> Result<KernelFacts> {
    let btf = Btf::from_sys_fs()?;
    let offsets = resolve(&btf).context("locating kernel struct fields in BTF")?;
    let drop_reason_listen_overflow =
        btf.enumerator("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW").and_then(|v| u32::try_from(v).ok());
    let recvmsg_flags_arg = match btf.function_params("tcp_recvmsg") {
        Some(6) => 4,
        _ => 3,
    };
    let labels_unavailable = if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        Some("request labels are read on x86_64 and aarch64 only")
    } else if btf.enumerator("BPF_FUNC_task_pt_regs").is_none() {
        Some("this kernel has no bpf_task_pt_regs helper (Linux 5.15+), which finds a call's buffer")
    } else {
        None
    };
    let task_btf = btf.enumerator("BPF_FUNC_get_current_task_btf").is_some();
    Ok(KernelFacts { offsets, drop_reason_listen_overflow, recvmsg_flags_arg, labels_unavailable, task_btf })
}
