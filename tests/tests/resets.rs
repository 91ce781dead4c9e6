//! Resets: a peer that resets mid-request, and a server that closes abortively.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
};

use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
    server::set_linger_zero,
};

/// Three clients send half a request and reset: each is a reset received and an
/// aborted request, never a timed one.
#[test]
fn peer_reset_mid_request_is_counted_and_aborted() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--connections".into()])?;
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr)?;
        stream.write_all(b"GET /?size=10 HTTP/1.1\r\nHost: la")?;
        std::thread::sleep(std::time::Duration::from_millis(50));
        set_linger_zero(&stream)?;
        drop(stream);
    }
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], 3, "{l}");
    assert_eq!(l["resets_received"], 3, "{l}");
    assert_eq!(l["resets_sent"], 0, "{l}");
    assert_eq!(l["aborted"], 3, "{l}");
    assert_eq!(phase_count(l, "think"), 0, "{l}");
    let closed: Vec<_> = lines.iter().filter(|v| v["type"] == "connection").collect();
    assert_eq!(closed.len(), 3);
    assert!(closed.iter().all(|c| c["reset_received"] == true && c["aborted"] == true), "{closed:?}");
    Ok(())
}

/// Many clients reset their connections: every server connection is reset by its peer
/// and closes; a client socket the kernel allocates at a closed connection's address
/// then sends a reset of its own. None of those is the server's.
#[test]
fn a_peer_reset_at_a_reused_address_is_not_a_reset_sent() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const CLIENTS: u64 = 200;
    let (server, addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    for _ in 0..CLIENTS {
        let mut stream = TcpStream::connect(addr)?;
        stream.write_all(b"GET /?size=10 HTTP/1.1\r\nHost: la")?;
        std::thread::sleep(std::time::Duration::from_millis(2));
        set_linger_zero(&stream)?;
        drop(stream);
    }
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["resets_sent"], 0, "{l}");
    // (A client may reset before the server accepted it: that connection is not seen.)
    let seen = l["connections"].as_u64().unwrap_or(0);
    assert!(seen >= CLIENTS * 9 / 10, "only {seen} of {CLIENTS} connections seen: {l}");
    assert_eq!(l["resets_received"], seen, "{l}");
    Ok(())
}

/// The server closes every connection with SO_LINGER 0 after its response: the kernel
/// resets it right after the close, and the reset is still attributed to the listener.
#[test]
fn abortive_server_close_is_a_reset_sent() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--abort-on-close"])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    for _ in 0..4 {
        let mut stream = TcpStream::connect(addr)?;
        stream.write_all(client::request_text(10, true).as_bytes())?;
        let mut response = Vec::new();
        // The reset may cut the read short; the response is not what is tested here.
        let _ = stream.read_to_end(&mut response);
    }
    // A keep-alive client is reset once too, when the server closes after its last request.
    let opts = ClientOptions {
        server: addr,
        connections: 1,
        requests: 2,
        size: 10,
        parallel: false,
        read_delay_ms: 0,
        rcvbuf: 0,
        pause_after_connect_ms: 0,
        paths: Vec::new(),
    };
    let _ = client::run(&opts);
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], 5, "{l}");
    assert_eq!(l["resets_sent"], 5, "{l}");
    assert_eq!(l["resets_received"], 0, "{l}");
    Ok(())
}
