//! The upstream side: per-peer connect and upstream times, failed connects, and think
//! time attributed to the peers it waited on.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::Stdio,
};

use serde_json::Value;
use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
    netns::Netns,
    pg::Cluster,
};

fn client_opts(server: SocketAddr, connections: usize, requests: usize) -> ClientOptions {
    ClientOptions { connections, requests, ..ClientOptions::to(server) }
}

fn upstream<'a>(report: &'a Value, peer: SocketAddr) -> anyhow::Result<&'a Value> {
    use anyhow::Context as _;
    report["upstreams"]
        .as_array()
        .context("report without upstreams")?
        .iter()
        .find(|u| u["peer"] == peer.to_string())
        .with_context(|| format!("no upstream {peer} in {report}"))
}

fn upstream_ms(u: &Value, phase: &str, stat: &str) -> f64 {
    u["phases"][phase][stat].as_u64().unwrap_or(u64::MAX) as f64 / 1e6
}

fn attributed_ns(l: &Value, peer: SocketAddr) -> u64 {
    l["think_attribution"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["peer"] == peer.to_string())
        .map(|p| p["wait_ns"].as_u64().unwrap_or(0))
        .sum()
}

/// A balancer over three backends, one adding 60 ms: traced on the balancer, the slow
/// backend's upstream p50 is its delay and ≥ 10× the others'; its think is theirs.
#[test]
fn bad_backend_stands_out_on_the_balancer() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const D: f64 = 60.0;
    let (_fast1, fast1) = start_lab_server(&[])?;
    let (_fast2, fast2) = start_lab_server(&[])?;
    let (_slow, slow) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "60"])?;
    let (balancer, addr) = start_lab_server(&[
        "--scenario",
        "balancer",
        "--backend",
        &fast1.to_string(),
        "--backend",
        &fast2.to_string(),
        "--backend",
        &slow.to_string(),
    ])?;
    let tracer = start_tracer(&["--pid".into(), balancer.pid().to_string()])?;
    client::run(&client_opts(addr, 2, 30))?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(report["lost_events"], 0, "{report}");
    let slow_u = upstream(report, slow)?;
    assert_eq!(slow_u["requests"], 20, "{slow_u}");
    let slow_p50 = upstream_ms(slow_u, "upstream", "p50_ns");
    assert_near("slow backend upstream p50", slow_p50, D, 5.0, 2.0);
    for fast in [fast1, fast2] {
        let u = upstream(report, fast)?;
        assert_eq!(u["requests"], 20, "{u}");
        // Every balancer thread connected to every backend once.
        assert_eq!(u["connections"], 2, "{u}");
        assert_eq!(u["phases"]["connect"]["count"], 2, "{u}");
        let p50 = upstream_ms(u, "upstream", "p50_ns");
        assert!(slow_p50 >= 10.0 * p50, "slow {slow_p50} ms vs {fast} {p50} ms");
    }
    assert_eq!(slow_u["phases"]["connect"]["count"], 2, "{slow_u}");
    // Bytes per peer: 20 requests of the lab client's size, 20 responses of 100 bytes.
    let request = client::request_text(100, false).len() as u64;
    assert_eq!(slow_u["bytes_out"], 20 * request, "{slow_u}");
    let l = listener(report, addr.port())?;
    let think = l["think_attribution"]["think_ns"].as_u64().unwrap_or(0);
    let on_slow = attributed_ns(l, slow);
    assert!(on_slow as f64 >= 0.9 * think as f64, "think {think} ns, on the slow backend {on_slow} ns: {l}");
    Ok(())
}

/// The first upstream call of a server traced while it had none is bound to its
/// request like every later one: the request its thread read is known to the connect.
/// Every request's think is the slow backend's, the first one's too.
#[test]
fn the_first_upstream_call_is_attributed() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_slow, slow) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "40"])?;
    let (balancer, addr) = start_lab_server(&["--scenario", "balancer", "--backend", &slow.to_string()])?;
    let tracer = start_tracer(&["--pid".into(), balancer.pid().to_string()])?;
    // One connection (one balancer thread), which connects to the backend at its first
    // request, after tracing started.
    client::run(&client_opts(addr, 1, 5))?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(report["lost_events"], 0, "{report}");
    let u = upstream(report, slow)?;
    assert_eq!((u["requests"].as_u64(), u["connections"].as_u64()), (Some(5), Some(1)), "{u}");
    let l = listener(report, addr.port())?;
    assert_eq!(l["requests"], 5, "{l}");
    let think = l["think_attribution"]["think_ns"].as_u64().unwrap_or(0);
    let on_slow = attributed_ns(l, slow);
    // Five waits of 40 ms; one not bound would leave 80% of the think attributed.
    assert!(on_slow >= 5 * 39_000_000, "on the slow backend {on_slow} ns: {l}");
    assert!(on_slow as f64 >= 0.95 * think as f64, "think {think} ns, on the slow backend {on_slow} ns: {l}");
    Ok(())
}

/// A server that does its work itself: think is local.
#[test]
fn local_work_is_local() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "local-work", "--delay-ms", "20"])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    client::run(&client_opts(addr, 1, 20))?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    let think = l["think_attribution"]["think_ns"].as_u64().unwrap_or(0);
    let local = l["think_attribution"]["local_ns"].as_u64().unwrap_or(0);
    assert!(think >= 20 * 19_000_000, "{l}");
    assert!(local as f64 >= 0.95 * think as f64, "local {local} of {think} ns: {l}");
    assert_eq!(report["upstreams"].as_array().map(Vec::len), Some(0), "{report}");
    Ok(())
}

/// A refused connect and one to a port whose SYNs a firewall drops (the client gives up
/// after 3.5 s): both counted under their peer with their outcome, and the SYNs sent
/// again while waiting (after 1 s and 3 s with the classic exponential backoff) counted.
#[test]
fn failed_connects_are_counted_per_peer() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let refused: SocketAddr = "127.0.0.1:7".parse()?;
    let blackholed: SocketAddr = "127.0.0.1:9".parse()?;
    // Kernels since 6.8 retry the first SYNs at a fixed 1 s (tcp_syn_linear_timeouts);
    // the namespace uses the exponential backoff that older kernels and most peers know.
    if std::path::Path::new("/proc/sys/net/ipv4/tcp_syn_linear_timeouts").exists() {
        ns.sysctl("net.ipv4.tcp_syn_linear_timeouts", "0")?;
    }
    ns.nft(&format!(
        "table inet lab {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         tcp dport {} drop\n  }}\n}}\n",
        blackholed.port()
    ))?;
    let mut connector = Proc {
        child: lab_command(Some(&ns))
            .args(["connect", "--timeout-ms", "3500", &refused.to_string(), &blackholed.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    };
    let tracer = start_tracer(&["--pid".into(), connector.pid().to_string()])?;
    writeln!(connector.child.stdin.take().expect("piped stdin"))?;
    let mut outcomes = Vec::new();
    for line in BufReader::new(connector.child.stdout.take().expect("piped stdout")).lines() {
        outcomes.push(line?);
    }
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert!(outcomes[0].contains("outcome=refused"), "{outcomes:?}");
    assert!(outcomes[1].contains("outcome=gave_up"), "{outcomes:?}");
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let r = upstream(report, refused)?;
    assert_eq!(r["connect_failures"]["refused"], 1, "{r}");
    assert_eq!(r["connections"], 0, "{r}");
    let b = upstream(report, blackholed)?;
    assert_eq!(b["connect_failures"]["abandoned"], 1, "{b}");
    assert_eq!(b["syn_retransmits"], 2, "{b}");
    assert_eq!(b["connections"], 0, "{b}");
    Ok(())
}

/// A backend querying PostgreSQL: a primary with an index and a "replica" of the same
/// million rows without it, read for one request in four. The replica's upstream time
/// dwarfs the primary's, and the think time of the requests that went to the replica is
/// spent waiting on it.
#[test]
fn slow_replica_is_found_behind_the_backend() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let primary = Cluster::start(1_000_000, true)?;
    let replica = Cluster::start(1_000_000, false)?;
    let (backend, addr) = start_database_backend(&primary, &replica)?;
    let tracer = start_tracer(&["--pid".into(), backend.pid().to_string()])?;
    client::run(&client_opts(addr, 1, 40))?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(report["lost_events"], 0, "{report}");
    let p = upstream(report, primary.addr())?;
    let r = upstream(report, replica.addr())?;
    let (p50_primary, p50_replica) = (upstream_ms(p, "upstream", "p50_ns"), upstream_ms(r, "upstream", "p50_ns"));
    eprintln!("upstream p50: primary {p50_primary:.3} ms, replica {p50_replica:.3} ms");
    assert!(p50_replica >= 10.0 * p50_primary, "replica p50 {p50_replica} ms vs primary {p50_primary} ms");
    let l = listener(report, addr.port())?;
    let think = l["think_attribution"]["think_ns"].as_u64().unwrap_or(0);
    let on_primary = attributed_ns(l, primary.addr());
    let on_replica = attributed_ns(l, replica.addr());
    // Think of the replica-bound requests is at most all think minus what the
    // primary-bound ones spent waiting on the primary.
    let replica_bound = think.saturating_sub(on_primary);
    assert!(
        on_replica as f64 >= 0.9 * replica_bound as f64,
        "replica {on_replica} ns of at most {replica_bound} ns of replica-bound think: {l}"
    );
    Ok(())
}

/// Upstream connections the process opened before the tracer started (a warmed-up
/// pool) are recognised as upstream, not taken for accepted connections, and timed from
/// their next request on.
#[test]
fn already_open_upstream_connections_are_traced() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_fast, fast) = start_lab_server(&[])?;
    let (_slow, slow) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "40"])?;
    let (balancer, addr) =
        start_lab_server(&["--scenario", "balancer", "--backend", &fast.to_string(), "--backend", &slow.to_string()])?;
    let stream = std::net::TcpStream::connect(addr)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut exchange = || -> anyhow::Result<()> {
        writer.write_all(client::request_text(100, false).as_bytes())?;
        client::read_response(&mut reader, 0)?;
        Ok(())
    };
    // Both upstream connections open before tracing starts.
    for _ in 0..4 {
        exchange()?;
    }
    let tracer = start_tracer(&["--pid".into(), balancer.pid().to_string()])?;
    for _ in 0..10 {
        exchange()?;
    }
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let s = upstream(report, slow)?;
    let f = upstream(report, fast)?;
    assert_eq!((s["requests"].as_u64(), f["requests"].as_u64()), (Some(5), Some(5)), "{report}");
    assert_eq!((s["connections"].as_u64(), f["connections"].as_u64()), (Some(0), Some(0)), "{report}");
    assert_near("slow upstream p50", upstream_ms(s, "upstream", "p50_ns"), 40.0, 5.0, 2.0);
    let l = listener(report, addr.port())?;
    assert_eq!(l["requests"], 10, "{l}");
    let on_slow = attributed_ns(l, slow) as f64 / 1e6;
    assert!((190.0..230.0).contains(&on_slow), "think on the slow backend {on_slow} ms: {l}");
    Ok(())
}
