//! The compatibility table on this kernel: with the BTF-typed tracepoints (and the
//! cgroup segment hook) skipped, every hook falls back to its raw tracepoint and the
//! phases come out the same; so do they with the segment hook on its tracepoint; with no way
//! to see state changes, tracing refuses to start and says why. (The trampoline and
//! kprobe implementations, which this kernel does not permit, run under `cargo xtask
//! vm-test` on Debian's kernels.)

use std::{collections::HashMap, net::SocketAddr, process::Command};

use serde_json::Value;
use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

const RAW: &str = "--skip-hook-kind=tp_btf,cgroup_skb,iter";
/// The segment hook on its (typed) tracepoint rather than the cgroup program.
const SEGMENT_TRACEPOINT: &str = "--skip-hook-kind=cgroup_skb";

fn client(server: SocketAddr) -> ClientOptions {
    ClientOptions::to(server)
}

/// The lab server with `server_args`, traced through raw tracepoints with
/// `--connections`: its listener's report entry and the connection lines.
fn traced_raw(
    server_args: &[&str],
    drive: impl FnOnce(SocketAddr) -> anyhow::Result<()>,
) -> anyhow::Result<(Value, Vec<Value>)> {
    traced_skipping(RAW, server_args, drive)
}

/// [`traced_raw`] with the hooks `skip` skips.
fn traced_skipping(
    skip: &str,
    server_args: &[&str],
    drive: impl FnOnce(SocketAddr) -> anyhow::Result<()>,
) -> anyhow::Result<(Value, Vec<Value>)> {
    let (server, addr) = start_lab_server(server_args)?;
    let tracer = start_tracer(&[skip.into(), "--connections".into(), "--pid".into(), server.pid().to_string()])?;
    drive(addr)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(report["lost_events"], 0, "{report}");
    let l = listener(report, addr.port())?.clone();
    let connections = lines.iter().filter(|v| v["type"] == "connection").cloned().collect();
    Ok((l, connections))
}

/// On this kernel every hook loads and attaches (a program the verifier refuses shows
/// as a hook with no implementation, whatever phases it serves), and both ways of
/// following TLS work.
#[test]
fn doctor_attaches_every_hook_here() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let out = Command::new(tracer_bin()).arg("doctor").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains(" none; lost: "), "a hook without an implementation: {text}");
    assert!(text.contains("TLS: uprobes work"), "{text}");
    assert!(text.contains("TLS without a library hook: followed from its records"), "{text}");
    // From 6.12 the state changes come from the socket-operation program (no state
    // tracepoint, which every socket on the machine would pay for).
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut version = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    if (version.next().unwrap_or(0), version.next().unwrap_or(0)) >= (6, 12) {
        let states = text.lines().find(|l| l.trim_start().starts_with("state changes")).unwrap_or_default();
        assert!(states.contains("iter/tcp"), "{text}");
    }
    Ok(())
}

#[test]
fn doctor_falls_back_to_raw_tracepoints() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let out = Command::new(tracer_bin()).args(["doctor", RAW]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for hook in ["inet_sock_set_state", "sock_recv_length", "sock_send_length", "tcp_probe", "sched_process_fork"] {
        assert!(text.contains(&format!("raw_tp/{hook}")), "{hook}: {text}");
    }
    assert!(text.contains("skipped (--skip-hook-kind tp_btf)"), "{text}");
    Ok(())
}

/// The segment hook on the tcp_probe tracepoint (where no cgroup v2 is mounted): data
/// arrival (recv_wait) and acknowledgements (delivery) as from the cgroup program.
#[test]
fn the_segment_tracepoint_measures_recv_wait_and_delivery() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let out = Command::new(tracer_bin()).args(["doctor", SEGMENT_TRACEPOINT]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let segments = text.lines().find(|l| l.trim_start().starts_with("segments received")).unwrap_or_default();
    assert!(segments.contains("tp_btf/tcp_probe"), "{text}");
    let (l, _) = traced_skipping(SEGMENT_TRACEPOINT, &["--scenario", "slow-reader"], |addr| {
        client::run(&ClientOptions { requests: 4, size: 200_000, read_delay_ms: 200, rcvbuf: 4096, ..client(addr) })?;
        Ok(())
    })?;
    assert_eq!(phase_count(&l, "delivery"), 4, "{l}");
    assert_near("delivery p50", phase_ms(&l, "delivery", "p50_ns"), 200.0, 5.0, 2.0);
    Ok(())
}

#[test]
fn without_state_changes_tracing_refuses_to_start() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let out = Command::new(tracer_bin()).args(["doctor", "--skip-hook-kind", "tp_btf,raw_tp,iter"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("tracing is impossible here: no way to attach the state changes hook"), "{text}");

    let me = std::process::id().to_string();
    let out = Command::new(tracer_bin())
        .args(["--skip-hook-kind", "tp_btf,raw_tp,iter", "--pid", &me, "--duration", "1s"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no way to attach the state changes hook") && err.contains("tracer doctor"), "{err}");
    Ok(())
}

/// slow-think through raw tracepoints; the connection lines carry the addresses and
/// ports the programs read from each socket: they must be the client's own.
#[test]
fn raw_tracepoints_measure_think_and_read_sockets_right() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut clients = Vec::new();
    let mut server = None;
    let (l, connections) = traced_raw(&["--scenario", "slow-think", "--delay-ms", "50"], |addr| {
        server = Some(addr);
        clients = client::run(&ClientOptions { connections: 4, requests: 5, ..client(addr) })?;
        Ok(())
    })?;
    assert_eq!(l["requests"], 20, "{l}");
    assert_eq!(phase_count(&l, "think"), 20, "{l}");
    assert_near("think p50", phase_ms(&l, "think", "p50_ns"), 50.0, 5.0, 2.0);
    assert_eq!(phase_count(&l, "delivery"), 20, "{l}");
    assert_eq!(phase_count(&l, "handshake"), 4, "{l}");
    let server = server.expect("driven");
    let by_remote: HashMap<String, &Value> =
        connections.iter().map(|c| (c["remote"].as_str().unwrap_or("").to_owned(), c)).collect();
    for c in &clients {
        let seen = by_remote
            .get(&format!("127.0.0.1:{}", c.local_port))
            .unwrap_or_else(|| panic!("no connection line for client port {}: {connections:?}", c.local_port));
        assert_eq!(seen["local"], server.to_string(), "{seen}");
        assert_eq!(seen["bytes_in"], c.bytes_sent, "{seen}");
        assert_eq!(seen["bytes_out"], c.bytes_received, "{seen}");
        assert_eq!(seen["requests"], 5, "{seen}");
    }
    Ok(())
}

/// Delivery (sequence numbers read from the socket and the ACK) and accept_wait
/// through raw tracepoints.
#[test]
fn raw_tracepoints_measure_delivery_and_accept_wait() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (l, _) = traced_raw(&["--scenario", "slow-reader"], |addr| {
        client::run(&ClientOptions { requests: 4, size: 200_000, read_delay_ms: 200, rcvbuf: 4096, ..client(addr) })?;
        Ok(())
    })?;
    assert_eq!(phase_count(&l, "delivery"), 4, "{l}");
    assert_near("delivery p50", phase_ms(&l, "delivery", "p50_ns"), 200.0, 5.0, 2.0);

    let (l, _) = traced_raw(&["--scenario", "slow-accept", "--delay-ms", "60"], |addr| {
        client::run(&ClientOptions { connections: 10, ..client(addr) })?;
        Ok(())
    })?;
    assert_eq!(phase_count(&l, "accept_wait"), 10, "{l}");
    assert_near("accept_wait p50", phase_ms(&l, "accept_wait", "p50_ns"), 60.0, 5.0, 2.0);
    Ok(())
}
