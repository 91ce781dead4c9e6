//! `tracer doctor` on this kernel: every hook has an implementation, every phase is
//! available; without a hook, the phases it carries are named unavailable and the exit
//! status says so.

use std::process::Command;

use tracer_tests::harness::{require_root, tracer_bin};

#[test]
fn doctor_reports_hooks_and_phases() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let out = Command::new(tracer_bin()).arg("doctor").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("kernel: Linux"), "{text}");
    assert!(text.contains("tp_btf/sock_send_length"), "{text}");
    for phase in ["handshake", "accept_wait", "recv_wait", "think", "send", "delivery", "connect", "upstream"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(phase) && l.ends_with("available") && !l.contains("unavailable")),
            "{phase}: {text}"
        );
    }
    // Whether other processes' system calls are taxed follows from the accept hook the
    // doctor chose: the syscall tracepoints tax them, any other does not.
    let accept = text.lines().find(|l| l.trim_start().starts_with("accept ")).unwrap_or_default();
    let tax = text.lines().find_map(|l| l.strip_prefix("system calls: ")).unwrap_or_default();
    if accept.contains("tracepoint/syscalls/sys_exit_accept") {
        assert!(tax.starts_with("taxed: accept from the syscall tracepoints"), "{text}");
        // Every hook that would spare them was tried first, and said why not.
        for better in ["lsm/sock_graft", "fexit/inet_csk_accept", "kretprobe/inet_csk_accept"] {
            assert!(text.lines().any(|l| l.trim_start().starts_with(&format!("not {better}: "))), "{better}: {text}");
        }
    } else if accept.contains("cgroup/getpeername4") {
        // On the peer's address: untaxed until a traced server accepts without asking it.
        assert!(tax.starts_with("untaxed while the traced servers ask accept() for the peer's address"), "{text}");
        assert!(tax.contains("from the first accept that asks for none"), "{text}");
    } else {
        assert!(tax.starts_with("untaxed"), "{text}");
    }
    // This kernel has bpf_task_pt_regs: the hooks load with their label paths.
    assert!(text.lines().any(|l| l.starts_with("request labels (--labels): available")), "{text}");

    let out = Command::new(tracer_bin()).args(["doctor", "--disable-hook", "tcp_probe"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.contains("delivery") && l.contains("unavailable") && l.contains("tcp_probe")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("think") && l.ends_with("available")), "{text}");

    // Without the receive hook no request's first bytes can be read.
    let out = Command::new(tracer_bin()).args(["doctor", "--disable-hook", "sock_recv_length"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("request labels (--labels): unavailable")), "{text}");

    let out = Command::new(tracer_bin()).args(["doctor", "--bogus"]).output()?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}
