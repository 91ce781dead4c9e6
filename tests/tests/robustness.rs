//! Bad input, faults and odd networks: clear errors, nothing lost silently.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
    netns::Netns,
};

fn client_opts(server: SocketAddr, connections: usize, requests: usize) -> ClientOptions {
    ClientOptions { connections, requests, ..ClientOptions::to(server) }
}

fn closed_connections(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|v| v["type"] == "connection").collect()
}

/// Without the privileges to load programs: exit 2, and the message names what is
/// missing — as an unprivileged user, and as root without CAP_BPF/CAP_PERFMON.
#[test]
fn missing_privileges_are_named() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, _) = start_lab_server(&[])?;
    let tracer = tracer_bin().display().to_string();
    let pid = server.pid().to_string();
    for setpriv in [
        vec!["--reuid=65534", "--regid=65534", "--clear-groups"],
        vec!["--bounding-set=-bpf,-perfmon,-sys_admin", "--inh-caps=-all"],
    ] {
        let out = Command::new("setpriv").args(&setpriv).args([&tracer, "--pid", &pid]).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "setpriv {setpriv:?}: {stderr}");
        assert!(stderr.contains("CAP_BPF") && stderr.contains("CAP_PERFMON"), "setpriv {setpriv:?}: {stderr}");
    }
    Ok(())
}

/// A kernel without the segment hook (simulated): delivery (and recv_wait) is reported as
/// unavailable, with the reason, not as zero; the other phases are measured; a check on
/// delivery fails saying why.
#[test]
fn an_unavailable_phase_is_reported_as_such() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&[
        "--pid".into(),
        server.pid().to_string(),
        "--disable-hook".into(),
        "tcp_probe".into(),
        "--check".into(),
        "delivery.count>=0".into(),
        "--check".into(),
        "think.count>=5".into(),
    ])?;
    client::run(&client_opts(addr, 1, 5))?;
    let (code, lines) = tracer.stop_with_code()?;
    let report = final_report(&lines)?;
    assert!(report["unavailable_phases"]["delivery"].as_str().unwrap_or("").contains("tcp_probe"), "{report}");
    let l = listener(report, addr.port())?;
    assert!(l["phases"]["delivery"]["unavailable"].is_string(), "{l}");
    assert!(l["phases"]["delivery"]["count"].is_null(), "delivery must not look like zero samples: {l}");
    assert_eq!(phase_count(l, "think"), 5, "{l}");
    assert_eq!(code, 1, "the delivery check must fail");
    let checks = &report["checks"];
    assert!(checks[0]["message"].as_str().unwrap_or("").contains("unavailable"), "{checks}");
    assert_eq!(checks[1]["passed"], true, "{checks}");
    Ok(())
}

/// --port with nothing listening yet: a warning, then the listener is traced once it
/// appears.
#[test]
fn a_port_with_nothing_listening_is_waited_for() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut tracer = Proc {
        child: Command::new(tracer_bin())
            .args(["--port", &port.to_string(), "--output", "json", "--duration", "4s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    };
    let stderr = BufReader::new(tracer.child.stderr.take().expect("piped"));
    let mut warned = false;
    for line in stderr.lines() {
        let line = line?;
        warned |= line.contains(&format!("nothing listens on port {port} yet"));
        if line.starts_with("tracer: tracing") {
            break;
        }
    }
    assert!(warned, "no warning about the empty port");
    let listen = format!("127.0.0.1:{port}");
    let (_server, addr) = start_lab_server(&["--listen", &listen])?;
    client::run(&client_opts(addr, 2, 2))?;
    let mut out = String::new();
    tracer.child.stdout.take().expect("piped").read_to_string(&mut out)?;
    assert!(tracer.child.wait()?.success());
    let lines: Vec<Value> = out.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let l = listener(final_report(&lines)?, port)?;
    assert_eq!(l["requests"], 4, "{l}");
    Ok(())
}

/// The traced server is killed (SIGKILL) in the middle of a request: the request counts
/// as aborted; with two servers traced, tracing goes on until both are gone, then the
/// tracer prints its report and exits 0 by itself.
#[test]
fn a_killed_server_ends_tracing_cleanly() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut slow, slow_addr) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "5000"])?;
    let (mut other, other_addr) = start_lab_server(&[])?;
    let mut tracer = start_tracer(&["--pid".into(), slow.pid().to_string(), "--pid".into(), other.pid().to_string()])?;
    let victim = thread::spawn(move || client::run(&client_opts(slow_addr, 1, 1)));
    thread::sleep(Duration::from_millis(500));
    slow.child.kill()?;
    slow.child.wait()?;
    assert!(victim.join().expect("client thread").is_err(), "the request should have failed");
    // Tracing goes on for the other server.
    thread::sleep(Duration::from_millis(1200));
    client::run(&client_opts(other_addr, 1, 3))?;
    unsafe { libc::kill(other.pid() as i32, libc::SIGKILL) };
    other.child.wait()?;
    let started = Instant::now();
    let lines = tracer.wait()?;
    assert!(started.elapsed() < Duration::from_secs(5), "the tracer did not notice its processes were gone");
    let report = final_report(&lines)?;
    let s = listener(report, slow_addr.port())?;
    assert_eq!((s["requests"].as_u64(), s["aborted"].as_u64()), (Some(1), Some(1)), "{s}");
    assert_eq!(phase_count(s, "think"), 0, "an aborted request is not timed: {s}");
    let o = listener(report, other_addr.port())?;
    assert_eq!(o["requests"], 3, "{o}");
    Ok(())
}

/// A ring buffer far too small for a burst: events are lost, counted and shown, the
/// report says it is incomplete, and nothing is over-counted.
#[test]
fn ring_buffer_overflow_is_counted_not_hidden() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--ring-buffer-size".into(), "4096".into()])?;
    client::run(&ClientOptions { parallel: true, ..client_opts(addr, 400, 2) })?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let lost = report["lost_events"].as_u64().unwrap_or(0);
    assert!(lost > 0, "a 4 KiB ring should overflow: {report}");
    assert_eq!(report["incomplete"], true, "{report}");
    let l = listener(report, addr.port())?;
    let requests = l["requests"].as_u64().unwrap_or(0);
    assert!(requests <= 800, "more requests than were made: {requests}");
    assert!(l["connections"].as_u64().unwrap_or(0) <= 400, "{l}");
    // The text report says so too.
    let (server, addr) = start_lab_server(&[])?;
    let mut text = Proc {
        child: Command::new(tracer_bin())
            .args(["--pid", &server.pid().to_string(), "--ring-buffer-size", "4096", "--duration", "5s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    };
    // The load starts once the tracer is tracing, not after a guess at how long
    // attaching takes.
    let mut stderr = BufReader::new(text.child.stderr.take().expect("piped")).lines();
    for line in stderr.by_ref() {
        if line?.starts_with("tracer: tracing") {
            break;
        }
    }
    // Kept read to the end: its warnings must not meet a closed pipe.
    let drain = thread::spawn(move || stderr.map_while(Result::ok).count());
    client::run(&ClientOptions { parallel: true, ..client_opts(addr, 400, 2) })?;
    let mut out = String::new();
    text.child.stdout.take().expect("piped").read_to_string(&mut out)?;
    drain.join().expect("stderr reader");
    assert!(out.contains("events were lost (ring buffer full)"), "{out}");
    Ok(())
}

/// `tracer … | head -1`: once the reader is gone the tracer exits 0, quietly.
#[test]
fn a_closed_stdout_ends_quietly() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&[])?;
    let mut tracer = Proc {
        child: Command::new(tracer_bin())
            .args(["--pid", &server.pid().to_string(), "--connections"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    };
    let stderr = tracer.child.stderr.take().expect("piped");
    let mut stderr_lines = BufReader::new(stderr).lines();
    for line in stderr_lines.by_ref() {
        if line?.starts_with("tracer: tracing") {
            break;
        }
    }
    let mut stdout = BufReader::new(tracer.child.stdout.take().expect("piped"));
    client::run(&client_opts(addr, 1, 1))?;
    let mut first = String::new();
    stdout.read_line(&mut first)?;
    assert!(first.starts_with("conn "), "{first}");
    drop(stdout); // like `head -1` exiting
    client::run(&client_opts(addr, 3, 1))?;
    thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGINT) };
    let status = tracer.child.wait()?;
    let rest: Vec<String> = stderr_lines.map_while(Result::ok).collect();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(!rest.iter().any(|l| l.contains("error")), "{rest:?}");
    Ok(())
}

/// A client that half-closes after its request still gets its answer: a normal
/// request. A client that resets while a large response is being written: counted,
/// not aborted, its think timed (the response had begun) but not delivered.
#[test]
fn half_closed_and_abandoned_responses_are_accounted() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "slow-reader", "--response-size", "4000000"])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--connections".into()])?;
    // Half-closed: request, shutdown(write), read the answer to the end.
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(client::request_text(100, false).as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    assert!(answer.len() > 100);
    // Abandoned: a 4 MB answer to a client that reads 1 KB and leaves.
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(client::request_text(4_000_000, false).as_bytes())?;
    let mut some = [0u8; 1024];
    stream.read_exact(&mut some)?;
    drop(stream);
    thread::sleep(Duration::from_millis(300));
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], 2, "{l}");
    assert_eq!(l["requests"], 2, "{l}");
    assert_eq!(l["aborted"], 0, "{l}");
    assert_eq!(phase_count(l, "think"), 2, "both responses had begun: {l}");
    assert_eq!(phase_count(l, "delivery"), 1, "only the half-closed one was delivered: {l}");
    assert_eq!(l["resets_received"], 1, "{l}");
    assert_eq!(closed_connections(&lines).len(), 2);
    Ok(())
}

/// IPv6, and IPv4 clients of an IPv6 socket (IPv4-mapped), in their usual notation.
#[test]
fn ipv6_and_mapped_addresses() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (v6, v6_addr) = start_lab_server(&["--listen", "[::1]:0"])?;
    let (dual, dual_addr) = start_lab_server(&["--listen", "[::]:0"])?;
    let tracer = start_tracer(&[
        "--pid".into(),
        v6.pid().to_string(),
        "--pid".into(),
        dual.pid().to_string(),
        "--connections".into(),
    ])?;
    client::run(&client_opts(v6_addr, 1, 2))?;
    let v4_client: SocketAddr = format!("127.0.0.1:{}", dual_addr.port()).parse()?;
    client::run(&client_opts(v4_client, 1, 2))?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(listener(report, v6_addr.port())?["requests"], 2);
    assert_eq!(listener(report, dual_addr.port())?["requests"], 2);
    let conns = closed_connections(&lines);
    let local = |port: u16| {
        conns.iter().find(|c| c["local"].as_str().is_some_and(|l| l.ends_with(&format!(":{port}")))).copied()
    };
    let c6 = local(v6_addr.port()).expect("IPv6 connection line");
    assert_eq!(c6["local"], format!("[::1]:{}", v6_addr.port()));
    assert!(c6["remote"].as_str().unwrap_or("").starts_with("[::1]:"), "{c6}");
    let mapped = local(dual_addr.port()).expect("IPv4-mapped connection line");
    assert_eq!(mapped["local"], format!("[::ffff:127.0.0.1]:{}", dual_addr.port()));
    assert!(mapped["remote"].as_str().unwrap_or("").starts_with("[::ffff:127.0.0.1]:"), "{mapped}");
    Ok(())
}

/// Server and clients in two network namespaces joined by a veth pair: phases and
/// peers as on loopback.
#[test]
fn two_namespaces_over_a_veth_pair() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let server_ns = Netns::new()?;
    let client_ns = Netns::new()?;
    let (a, b) = (format!("vt{}a", std::process::id() % 100_000), format!("vt{}b", std::process::id() % 100_000));
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("ip").args(args).status()?;
        anyhow::ensure!(status.success(), "ip {args:?}");
        Ok(())
    };
    ip(&["link", "add", &a, "netns", &server_ns.name, "type", "veth", "peer", "name", &b, "netns", &client_ns.name])?;
    ip(&["-n", &server_ns.name, "addr", "add", "10.231.0.1/24", "dev", &a])?;
    ip(&["-n", &client_ns.name, "addr", "add", "10.231.0.2/24", "dev", &b])?;
    ip(&["-n", &server_ns.name, "link", "set", &a, "up"])?;
    ip(&["-n", &client_ns.name, "link", "set", &b, "up"])?;
    let (server, addr) = start_lab_server_in(
        Some(&server_ns),
        &["--listen", "10.231.0.1:0", "--scenario", "slow-think", "--delay-ms", "30"],
    )?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--connections".into()])?;
    let results = run_lab_client(Some(&client_ns), &["--server", &addr.to_string(), "--requests", "5"])?;
    assert_eq!(results.len(), 1);
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["requests"], 5, "{l}");
    assert_eq!(phase_count(l, "handshake"), 1, "{l}");
    assert_near("think p50", phase_ms(l, "think", "p50_ns"), 30.0, 5.0, 2.0);
    let conns = closed_connections(&lines);
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["local"], addr.to_string());
    assert!(conns[0]["remote"].as_str().unwrap_or("").starts_with("10.231.0.2:"), "{:?}", conns[0]);
    Ok(())
}

/// A server that also talks UDP and over Unix sockets: only its TCP listener shows up,
/// with exact counts.
#[test]
fn udp_and_unix_sockets_are_ignored() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--side-traffic"])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    client::run(&client_opts(addr, 2, 5))?;
    thread::sleep(Duration::from_millis(500));
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let listeners = report["listeners"].as_array().expect("listeners");
    assert_eq!(listeners.len(), 1, "{report}");
    assert_eq!(listeners[0]["requests"], 10, "{report}");
    assert_eq!(report["upstreams"].as_array().map(Vec::len), Some(0), "{report}");
    assert_eq!(report["lost_events"], 0);
    Ok(())
}

/// Per-socket state is bounded by --max-sockets: connections beyond it are counted as
/// untracked and the report says it is incomplete; the ones tracked are exact.
#[test]
fn state_beyond_max_sockets_is_counted() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "300"])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--max-sockets".into(), "4".into()])?;
    // Ten connections open at once: only four fit.
    client::run(&ClientOptions { parallel: true, ..client_opts(addr, 10, 1) })?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let untracked = report["untracked_connections"].as_u64().unwrap_or(0);
    assert!(untracked >= 6, "{report}");
    assert_eq!(report["incomplete"], true, "{report}");
    let l = listener(report, addr.port())?;
    let connections = l["connections"].as_u64().unwrap_or(0);
    assert!(connections <= 4 && connections + untracked >= 10, "{l}");
    assert_eq!(l["requests"].as_u64(), Some(connections), "every tracked connection made one request: {l}");
    Ok(())
}
