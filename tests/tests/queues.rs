//! Handshakes under pressure, in network namespaces the tests create: listen-queue
//! overflows and a lost final ACK.

use tracer_tests::{
    harness::*,
    netns::{tcp_ext_counter, Netns},
};

/// Backlog 1 and more concurrent connects than the queue holds: the listen drops the
/// tracer reports equal the namespace's ListenDrops delta.
#[test]
fn listen_drops_match_the_namespace_counter() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let (server, addr) =
        start_lab_server_in(Some(&ns), &["--scenario", "slow-accept", "--delay-ms", "100", "--backlog", "1"])?;
    let before = tcp_ext_counter(server.pid(), "ListenDrops")?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    let results = run_lab_client(Some(&ns), &["--server", &addr.to_string(), "--connections", "16", "--parallel"])?;
    assert_eq!(results.len(), 16);
    let after = tcp_ext_counter(server.pid(), "ListenDrops")?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    let expected = after - before;
    eprintln!("ListenDrops delta {expected}; tracer: {}", l["listen_drops"]);
    assert!(expected > 0, "the test did not overflow the queue: {l}");
    assert_eq!(l["listen_drops"], expected, "{l}");
    assert_eq!(l["connections"], 16, "{l}");
    Ok(())
}

/// A handshake whose final ACK arrives when the accept queue is full: the kernel drops
/// it (one ListenDrops, but two in the listener's own drop counter) and the tracer must
/// count it once. Connection C's first ACK is lost to a firewall rule while A and B fill
/// the queue; C's SYN-ACK retransmit then brings an ACK that overflows.
#[test]
fn overflowed_handshake_ack_counts_once() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    // Accepts at 3 s, 6 s and 9 s after start; a queue of two (backlog 1).
    let (server, addr) =
        start_lab_server_in(Some(&ns), &["--scenario", "slow-accept", "--delay-ms", "3000", "--backlog", "1"])?;
    let server_addr = addr.to_string();
    let before = tcp_ext_counter(server.pid(), "ListenDrops")?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    let client = |extra: &[&str]| {
        lab_command(Some(&ns))
            .args(["client", "--server", &server_addr])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
    };
    let a = client(&[])?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    ns.nft(&drop_final_ack(addr.port()))?;
    ns.sysctl("net.netfilter.nf_conntrack_acct", "1")?;
    let c = client(&["--pause-after-connect-ms", "5000"])?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    ns.nft("delete table inet lab\n")?;
    let b = client(&[])?;
    for child in [a, b, c] {
        let status = child.wait_with_output()?.status;
        assert!(status.success(), "a lab client failed: {status}");
    }
    let after = tcp_ext_counter(server.pid(), "ListenDrops")?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    eprintln!("ListenDrops delta {}; tracer: {}", after - before, l["listen_drops"]);
    assert!(after > before, "no ACK overflowed: {l}");
    assert_eq!(l["listen_drops"], after - before, "{l}");
    assert_eq!(l["connections"], 3, "{l}");
    Ok(())
}

/// An nftables ruleset dropping the first ACK of every handshake to `port` (the second
/// packet of the connection in the client's direction).
fn drop_final_ack(port: u16) -> String {
    format!(
        "table inet lab {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         tcp dport {port} tcp flags == ack ct original packets 2 drop\n  }}\n}}\n"
    )
}

/// The final ACK of one handshake is dropped: the client's connect() returns at once,
/// the server retransmits its SYN-ACK after about a second, and the handshake the tracer
/// reports covers that second, with one retransmit.
#[test]
fn lost_final_ack_is_in_the_handshake() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let (server, addr) = start_lab_server_in(Some(&ns), &["--scenario", "plain"])?;
    // The second packet of the connection in the client's direction is the final ACK.
    ns.nft(&drop_final_ack(addr.port()))?;
    ns.sysctl("net.netfilter.nf_conntrack_acct", "1")?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    // Say nothing until the SYN-ACK retransmit has completed the handshake: a data
    // segment would complete it at once.
    let results = run_lab_client(Some(&ns), &["--server", &addr.to_string(), "--pause-after-connect-ms", "1800"])?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    let connect_ms = results[0]["connect_ms"];
    assert!(connect_ms < 50.0, "connect() took {connect_ms} ms");
    assert_eq!(l["synack_retransmits"], 1, "{l}");
    assert_eq!(phase_count(l, "handshake"), 1, "{l}");
    let handshake = phase_ms(l, "handshake", "max_ns");
    assert!((1000.0..1800.0).contains(&handshake), "handshake {handshake} ms: {l}");
    assert_eq!(l["requests"], 1, "{l}");
    Ok(())
}
