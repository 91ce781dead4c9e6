//! The tracer follows exactly the connections of the process it traces.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
};

use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

/// N connections to a traced server, each with known byte counts, while an untraced
/// process serves M others at the same time: exactly the N are reported, with their
/// ports and byte counts.
#[test]
fn reports_exactly_the_traced_connections_with_their_bytes() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 12;
    const M: usize = 15;
    let (server, addr) = start_lab_server(&[])?;
    let (_other, other_addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--connections".into()])?;

    let untraced = thread::spawn(move || {
        client::run(&ClientOptions {
            server: other_addr,
            connections: M,
            requests: 2,
            size: 333,
            parallel: true,
            read_delay_ms: 0,
            rcvbuf: 0,
            pause_after_connect_ms: 0,
            paths: Vec::new(),
        })
    });
    // Different sizes per connection, so a byte count cannot match by accident.
    let mut expected = HashMap::new();
    for i in 0..N {
        let r = client::one_connection(&ClientOptions {
            server: addr,
            connections: 1,
            requests: 1 + i % 3,
            size: 1000 + 17 * i,
            parallel: false,
            read_delay_ms: 0,
            rcvbuf: 0,
            pause_after_connect_ms: 0,
            paths: Vec::new(),
        })?;
        expected.insert(r.local_port, r);
    }
    let untraced = untraced.join().expect("untraced client")?;
    assert_eq!(untraced.len(), M);

    let lines = tracer.stop()?;
    let conns: Vec<_> = lines.iter().filter(|l| l["type"] == "connection").collect();
    assert_eq!(conns.len(), N, "connections reported: {conns:#?}");
    for c in conns {
        let local: std::net::SocketAddr = c["local"].as_str().unwrap().parse()?;
        let remote: std::net::SocketAddr = c["remote"].as_str().unwrap().parse()?;
        assert_eq!(local.port(), addr.port(), "{c}");
        let want = expected.get(&remote.port()).unwrap_or_else(|| panic!("unexpected connection {c}"));
        assert_eq!(c["bytes_in"], want.bytes_sent, "{c}");
        assert_eq!(c["bytes_out"], want.bytes_received, "{c}");
        assert_eq!(c["requests"], want.requests, "{c}");
        assert_eq!(c["pid"], server.pid(), "{c}");
    }
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], N);
    assert_eq!(report["listeners"].as_array().unwrap().len(), 1, "only the traced listener: {report}");
    Ok(())
}

/// A server that listens without binding first (the kernel picks its port at listen(),
/// after the state change the tracer sees): it serves `n` connections one by one, a
/// line each, answered with a line, then exits. Prints its port.
const AUTOBIND_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.listen(64)
print(s.getsockname()[1], flush=True)
for _ in range(int(sys.argv[1])):
    c, _ = s.accept()
    data = b""
    while not data.endswith(b"\n"):
        more = c.recv(4096)
        if not more:
            break
        data += more
    c.sendall(b"pong\n")
    c.close()
"#;

/// One connection: a line sent, the answer read to the server's close.
fn ping(addr: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(b"ping\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    assert_eq!(answer, "pong\n");
    Ok(())
}

/// The tracer records a passive connection's setup only on the ports the traced
/// processes listen on, which it learns as they begin listening. A listener whose port
/// the kernel picks at listen(), after that moment, is recorded in full all the same,
/// from its first connection.
#[test]
fn a_listener_with_a_port_picked_at_listen_is_recorded_from_its_first_connection() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 5;
    let (mut tracer, mut stdout) = trace_command(&["python3", "-c", AUTOBIND_SERVER, &N.to_string()])?;
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let port: u16 = line.trim().parse()?;
    for _ in 0..N {
        ping(SocketAddr::from(([127, 0, 0, 1], port)))?;
    }
    assert_eq!(tracer.child.wait()?.code(), Some(0));
    let lines = json_lines(stdout)?;
    let report = final_report(&lines)?;
    let l = listener(report, port)?;
    assert_eq!(report["missed_setups"], 0, "{report}");
    assert_eq!(l["connections"], N, "{l}");
    assert_eq!(l["requests"], N, "{l}");
    assert_eq!(phase_count(l, "handshake"), N as u64, "{l}");
    assert_eq!(phase_count(l, "accept_wait"), N as u64, "{l}");
    assert_eq!(phase_count(l, "think"), N as u64, "{l}");
    Ok(())
}

/// A server that listens on a loopback port and never accepts. Prints its port.
const NEVER_ACCEPTS: &str = r#"
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(128)
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"#;

/// Connections to a server that is not traced take no per-socket state of the tracer:
/// with K of them established and waiting in that server's accept queue, the tracer
/// holds no state at its end, while the traced server's connections were all recorded.
#[test]
fn connections_of_a_server_not_traced_take_no_state() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const K: usize = 20;
    let (server, addr) = start_lab_server(&[])?;
    let mut child =
        Command::new("python3").args(["-c", NEVER_ACCEPTS]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let _other = Proc { child };
    let mut line = String::new();
    out.read_line(&mut line)?;
    let other = SocketAddr::from(([127, 0, 0, 1], line.trim().parse::<u16>()?));
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    // Established (the kernel completes the handshake) and queued, never accepted.
    let queued: Vec<TcpStream> = (0..K).map(|_| TcpStream::connect(other)).collect::<Result<_, _>>()?;
    let served = client::run(&ClientOptions { connections: 4, requests: 2, ..ClientOptions::to(addr) })?;
    assert_eq!(served.len(), 4);
    let lines = tracer.stop()?;
    drop(queued);
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], 4, "{l}");
    assert_eq!(phase_count(l, "handshake"), 4, "{l}");
    assert_eq!(l["requests"], 8, "{l}");
    assert_eq!(report["missed_setups"], 0, "{report}");
    assert_eq!(report["tracked_sockets"], 0, "the states held at the end: {report}");
    Ok(())
}
