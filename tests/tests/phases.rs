//! Each lab scenario injects one fault; the tracer must put the injected delay in the
//! phase it belongs to, within max(5%, 2 ms), and keep the other phases small.

use std::{net::SocketAddr, thread};

use serde_json::Value;
use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

fn client(server: SocketAddr) -> ClientOptions {
    ClientOptions::to(server)
}

/// Starts a lab server with `args`, traces it, runs `drive`, and returns its listener's
/// entry of the final report.
fn traced(args: &[&str], drive: impl FnOnce(SocketAddr) -> anyhow::Result<()>) -> anyhow::Result<Value> {
    let (server, addr) = start_lab_server(args)?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    drive(addr)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(report["lost_events"], 0, "{report}");
    Ok(listener(report, addr.port())?.clone())
}

fn slow_think(delay_ms: u64) -> anyhow::Result<()> {
    let d = delay_ms.to_string();
    let l = traced(&["--scenario", "slow-think", "--delay-ms", &d], |addr| {
        client::run(&ClientOptions { requests: 20, ..client(addr) })?;
        Ok(())
    })?;
    assert_eq!(l["requests"], 20, "{l}");
    assert_eq!(phase_count(&l, "think"), 20, "{l}");
    assert_near("think p50", phase_ms(&l, "think", "p50_ns"), delay_ms as f64, 5.0, 2.0);
    for other in ["recv_wait", "send", "accept_wait", "handshake"] {
        let p50 = phase_ms(&l, other, "p50_ns");
        assert!(p50 < 5.0, "{other} p50 {p50} ms should stay small in slow-think: {l}");
    }
    Ok(())
}

#[test]
fn slow_think_50ms_is_think() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    slow_think(50)
}

#[test]
fn slow_think_300ms_is_think() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    slow_think(300)
}

/// An exchange longer than the one-line event can carry (4.29 s from its first time to
/// its last) comes in the full form, timed the same.
#[test]
fn think_beyond_the_short_event_span() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const D: u64 = 4_500;
    let l = traced(&["--scenario", "slow-think", "--delay-ms", &D.to_string()], |addr| {
        client::run(&client(addr))?;
        Ok(())
    })?;
    assert_eq!(l["requests"], 1, "{l}");
    assert_eq!(phase_count(&l, "think"), 1, "{l}");
    assert_near("think p50", phase_ms(&l, "think", "p50_ns"), D as f64, 5.0, 2.0);
    Ok(())
}

fn body_stall(delay_ms: u64) -> anyhow::Result<()> {
    let d = delay_ms.to_string();
    let l = traced(&["--scenario", "body-stall", "--delay-ms", &d], |addr| {
        client::run(&ClientOptions { requests: 20, size: 10, ..client(addr) })?;
        Ok(())
    })?;
    assert_eq!(phase_count(&l, "send"), 20, "{l}");
    assert_near("send p50", phase_ms(&l, "send", "p50_ns"), delay_ms as f64, 5.0, 2.0);
    for other in ["think", "recv_wait", "delivery"] {
        let p50 = phase_ms(&l, other, "p50_ns");
        assert!(p50 < 5.0, "{other} p50 {p50} ms should stay small in body-stall: {l}");
    }
    Ok(())
}

#[test]
fn body_stall_50ms_is_send() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    body_stall(50)
}

#[test]
fn body_stall_300ms_is_send() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    body_stall(300)
}

/// Sequential connections to a server sleeping D before each accept(): each waits
/// about D in the accept queue.
#[test]
fn slow_accept_is_accept_wait() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const D: u64 = 60;
    let l = traced(&["--scenario", "slow-accept", "--delay-ms", &D.to_string()], |addr| {
        client::run(&ClientOptions { connections: 21, ..client(addr) })?;
        Ok(())
    })?;
    assert_eq!(phase_count(&l, "accept_wait"), 21, "{l}");
    assert_near("accept_wait p50", phase_ms(&l, "accept_wait", "p50_ns"), D as f64, 5.0, 2.0);
    let think = phase_ms(&l, "think", "p50_ns");
    assert!(think < 5.0, "think p50 {think} ms: {l}");
    Ok(())
}

/// 1,000 requests over 10 keep-alive connections: exactly 1,000 exchanges.
#[test]
fn keep_alive_counts_every_request_once() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let l = traced(&[], |addr| {
        let results = client::run(&ClientOptions { connections: 10, requests: 100, parallel: true, ..client(addr) })?;
        assert_eq!(results.iter().map(|r| r.requests).sum::<usize>(), 1000);
        Ok(())
    })?;
    assert_eq!(l["requests"], 1000, "{l}");
    assert_eq!(l["connections"], 10, "{l}");
    assert_eq!(phase_count(&l, "think"), 1000, "{l}");
    assert_eq!(phase_count(&l, "send"), 1000, "{l}");
    assert_eq!(l["aborted"], 0, "{l}");
    Ok(())
}

/// N workers, 2N clients each making R requests of think T: the N clients served last
/// wait R×T for their first read, which is recv_wait; think stays T.
#[test]
fn starved_workers_is_recv_wait() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 2;
    const R: usize = 5;
    const T: u64 = 40;
    let l = traced(
        &["--scenario", "starved-workers", "--workers", &N.to_string(), "--delay-ms", &T.to_string()],
        |addr| {
            client::run(&ClientOptions { connections: 2 * N, requests: R, parallel: true, ..client(addr) })?;
            Ok(())
        },
    )?;
    let queued_ms = (R as u64 * T) as f64;
    assert_eq!(phase_count(&l, "recv_wait"), (2 * N * R) as u64, "{l}");
    // The N queued connections' first requests: the slowest recv_wait samples.
    assert_near("recv_wait max", phase_ms(&l, "recv_wait", "max_ns"), queued_ms, 10.0, 2.0);
    assert_near("recv_wait p99", phase_ms(&l, "recv_wait", "p99_ns"), queued_ms, 10.0, 2.0);
    // Every other request is read at once.
    let p50 = phase_ms(&l, "recv_wait", "p50_ns");
    assert!(p50 < 5.0, "recv_wait p50 {p50} ms: {l}");
    assert_near("think p50", phase_ms(&l, "think", "p50_ns"), T as f64, 5.0, 2.0);
    Ok(())
}

/// A client with a small receive buffer that reads a large response D late: the
/// response sits in the server's send queue against a full window, so delivery ≈ D.
#[test]
fn slow_reader_is_delivery() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const D: u64 = 300;
    let l = traced(&["--scenario", "slow-reader"], |addr| {
        let opts = ClientOptions { requests: 4, size: 200_000, read_delay_ms: D, rcvbuf: 4096, ..client(addr) };
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let o = opts.clone();
                thread::spawn(move || client::run(&o))
            })
            .collect();
        for h in handles {
            h.join().expect("client")?;
        }
        Ok(())
    })?;
    assert_eq!(phase_count(&l, "delivery"), 12, "{l}");
    assert_near("delivery p50", phase_ms(&l, "delivery", "p50_ns"), D as f64, 5.0, 2.0);
    let send = phase_ms(&l, "send", "p50_ns");
    assert!(send < 5.0, "send p50 {send} ms: the response must fit the send buffer: {l}");
    Ok(())
}
