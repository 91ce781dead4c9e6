//! A response larger than the server's send buffer, to a client that reads late: the
//! server's one write blocks until the client reads. That time is the response's
//! `send`, not `think`. The server (here, in the test process, traced by its port) times
//! itself: from the read that completed a request to the start of its write, and the
//! write call itself.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    thread,
    time::{Duration, Instant},
};

use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

const D_MS: u64 = 100;
const BODY: usize = 300_000;
const REQUESTS: usize = 5;

/// Serves `REQUESTS` requests on one connection with SO_SNDBUF 16 KiB, answering each
/// with one `write_all` of the whole response; per request, the gap from the read that
/// completed it to the write's start, and the write's duration.
fn serve(listener: TcpListener) -> anyhow::Result<Vec<(Duration, Duration)>> {
    let (mut stream, _) = listener.accept()?;
    tracer_tests::server::set_sndbuf(&stream, 16 * 1024)?;
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    response.resize(response.len() + BODY, b'x');
    let mut times = Vec::new();
    let mut pending = Vec::new();
    while times.len() < REQUESTS {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk)?;
        let read_done = Instant::now();
        anyhow::ensure!(n > 0, "client closed after {} requests", times.len());
        pending.extend_from_slice(&chunk[..n]);
        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        pending.drain(..end + 4);
        let write_start = Instant::now();
        stream.write_all(&response)?;
        times.push((write_start - read_done, write_start.elapsed()));
    }
    Ok(times)
}

#[test]
fn blocked_write_is_send_not_think() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let socket = TcpListener::bind("127.0.0.1:0")?;
    let addr = socket.local_addr()?;
    // By port: the test process's own client connections are not the server's.
    let tracer = start_tracer(&["--port".into(), addr.port().to_string()])?;
    let server = thread::spawn(move || serve(socket));
    // The client reads the headers, waits D, then reads the body, through a 16 KiB
    // receive buffer: the server's write blocks for about D.
    client::run(&ClientOptions {
        server: addr,
        connections: 1,
        requests: REQUESTS,
        size: BODY,
        parallel: false,
        read_delay_ms: D_MS,
        rcvbuf: 16 * 1024,
        pause_after_connect_ms: 0,
        paths: Vec::new(),
    })?;
    let own = server.join().expect("server thread")?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut writes: Vec<f64> = own.iter().map(|&(_, w)| ms(w)).collect();
    writes.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = own.iter().map(|&(g, _)| ms(g)).collect();
    eprintln!(
        "{}server's own: read→write gaps {gaps:.3?} ms, write calls {writes:.1?} ms; tracer think p50 {:.3} ms max \
         {:.3} ms, send p50 {:.1} ms max {:.1} ms",
        describe(report),
        phase_ms(l, "think", "p50_ns"),
        phase_ms(l, "think", "max_ns"),
        phase_ms(l, "send", "p50_ns"),
        phase_ms(l, "send", "max_ns"),
    );

    // The truth side: the server answered at once and its write blocked for about D.
    assert!(gaps.iter().all(|&g| g < 1.0), "the server's own read→write gaps {gaps:?} ms");
    assert!(writes.iter().all(|&w| w >= D_MS as f64 * 0.9), "the server's write calls {writes:?} ms");

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    v.eq("requests", l["requests"].as_u64(), Some(REQUESTS as u64));
    v.eq("timed requests", phase_count(l, "think"), REQUESTS as u64);
    v.eq("send samples", phase_count(l, "send"), REQUESTS as u64);
    v.extend(counts_not_adding_up(report));
    let think_max = phase_ms(l, "think", "max_ns");
    v.check(think_max < 1.0, || format!("think max {think_max:.3} ms, not below 1 ms"));
    let tolerance = |x: f64| (x * 0.05).max(2.0);
    let median = writes[writes.len() / 2];
    v.near(
        "send p50 against the median write call (ms)",
        phase_ms(l, "send", "p50_ns"),
        median,
        0.0,
        tolerance(median),
    );
    let longest = writes[writes.len() - 1];
    v.near(
        "send max against the longest write call (ms)",
        phase_ms(l, "send", "max_ns"),
        longest,
        0.0,
        tolerance(longest),
    );
    v.finish();
    Ok(())
}
