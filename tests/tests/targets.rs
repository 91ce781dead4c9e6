//! Who is traced: by port, children forked after the tracer started, and connections
//! that were already open.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
};

use tracer_tests::{
    client::{self, request_text, ClientOptions},
    harness::*,
};

fn opts(server: SocketAddr, connections: usize, requests: usize) -> ClientOptions {
    ClientOptions {
        server,
        connections,
        requests,
        size: 50,
        parallel: false,
        read_delay_ms: 0,
        rcvbuf: 0,
        pause_after_connect_ms: 0,
        paths: Vec::new(),
    }
}

#[test]
fn port_mode_traces_whoever_accepts_on_the_port() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_server, addr) = start_lab_server(&[])?;
    let (_other, other) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--port".into(), addr.port().to_string()])?;
    client::run(&opts(addr, 5, 3))?;
    client::run(&opts(other, 4, 1))?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], 5, "{l}");
    assert_eq!(l["requests"], 15, "{l}");
    assert!(listener(report, other.port()).is_err(), "the other port is not traced: {report}");
    Ok(())
}

/// A shell traced by PID forks the server one second later: the server's connections
/// are traced from its first accept.
#[test]
fn children_forked_after_start_are_traced() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let script = format!("sleep 1; {} server; true", lab_bin().display());
    let mut child = Command::new("sh").args(["-c", &script]).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let shell = Proc { child };
    let tracer = start_tracer(&["--pid".into(), shell.pid().to_string()])?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr: SocketAddr = line.trim().trim_start_matches("listening on ").parse()?;
    client::run(&opts(addr, 3, 2))?;
    let lines = tracer.stop()?;
    let l = listener(final_report(&lines)?, addr.port())?.clone();
    assert_eq!(l["connections"], 3, "{l}");
    assert_eq!(l["requests"], 6, "{l}");
    // The lab server is the shell's child; kill it with the shell's process group.
    let _ = Command::new("pkill").args(["-P", &shell.pid().to_string()]).status();
    Ok(())
}

fn exchange(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream.write_all(request_text(10, false).as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(())
}

/// A keep-alive connection opened before the tracer: measured from its next request on.
#[test]
fn connections_open_before_start_are_measured_from_their_next_request() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "20"])?;
    let mut stream = TcpStream::connect(addr)?;
    exchange(&mut stream)?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    for _ in 0..5 {
        exchange(&mut stream)?;
    }
    drop(stream);
    // Its close is seen, though the kernel established it with no program watching:
    // its state is gone (where the socket-operation program takes the state changes,
    // the connection was flagged for them as tracing started).
    std::thread::sleep(std::time::Duration::from_millis(200));
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(report["tracked_sockets"], 0, "{report}");
    let l = listener(report, addr.port())?.clone();
    assert_eq!(l["requests"], 5, "{l}");
    assert_eq!(phase_count(&l, "think"), 5, "{l}");
    assert_near("think p50", phase_ms(&l, "think", "p50_ns"), 20.0, 5.0, 2.0);
    // Its setup happened before tracing: no handshake or accept_wait sample.
    assert_eq!(phase_count(&l, "accept_wait"), 0, "{l}");
    Ok(())
}
