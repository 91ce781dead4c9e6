//! Node.js (Debian's nodejs, OpenSSL built in) serving HTTPS. Node drives OpenSSL through
//! memory buffers of its own, making no socket call inside the library's calls: its
//! handshakes are followed from their TLS records, and once a connection's handshake is
//! read, the library's calls Node makes right after reading it tie it to the socket.
//! The handshake must be no request, session tickets must not end think, and the
//! client's close_notify no message. Each request waits 25 ms on a timer; the truth is
//! Node's own clock (`process.hrtime`) and the number of requests it served.

use std::process::Command;

use tracer_tests::{
    harness::*,
    tls::{curl, TestCert},
};

const REQUESTS: usize = 20;

/// The server: certificate and key paths. A request's handling runs from its `request`
/// event to the return of `res.end()`. A line on stdin prints the count and the sum.
const SERVER_JS: &str = r#"
const https = require('https');
const fs = require('fs');
const [cert, key] = process.argv.slice(2);
let requests = 0, handlingNs = 0n;
const server = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, (req, res) => {
  const start = process.hrtime.bigint();
  setTimeout(() => {
    res.writeHead(200, { 'Content-Length': 5 });
    res.end('hello');
    handlingNs += process.hrtime.bigint() - start;
    requests++;
  }, 25);
});
server.listen(0, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
process.stdin.on('data', () => {
  console.log(`requests=${requests} handling_ns=${handlingNs}`);
});
"#;

#[test]
fn node_https_through_its_memory_buffers() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cert = TestCert::new()?;
    let script = std::env::temp_dir().join(format!("tracer-node-https-{}.js", std::process::id()));
    std::fs::write(&script, SERVER_JS)?;
    let mut node = Command::new("node");
    node.arg(&script).arg(&cert.cert).arg(&cert.key);
    let mut server = start_server_process(node)?;
    let _ = std::fs::remove_file(&script);

    let tracer = start_tracer(&["--pid".into(), server.proc.pid().to_string(), "--connections".into()])?;
    let url = format!("https://{}/", server.addr);
    // Half on new connections, half on one keep-alive connection.
    let fresh = curl(&vec![url.clone(); REQUESTS / 2], true, "--tlsv1.3")?;
    let reused = curl(&vec![url; REQUESTS / 2], false, "--tlsv1.3")?;
    let lines = tracer.stop()?;
    let own = server.ask()?;
    let report = final_report(&lines)?;
    let l = listener(report, server.addr.port())?;
    eprintln!("{}server's own: {own:?}", describe(report));
    for c in lines.iter().filter(|c| c["type"] == "connection" && c["requests"] != 1) {
        eprintln!("connection {c}");
    }

    assert!(fresh.iter().chain(&reused).all(|t| t.status == 200), "{fresh:?} {reused:?}");
    assert_eq!(own["requests"], REQUESTS as f64, "{own:?}");
    let connections = (REQUESTS / 2 + 1) as u64;

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    v.eq("requests against the server's own count", l["requests"].as_u64(), Some(REQUESTS as u64));
    v.eq("timed requests", phase_count(l, "think"), REQUESTS as u64);
    v.eq("aborted", l["aborted"].as_u64(), Some(0));
    v.extend(counts_not_adding_up(report));
    v.eq("tls samples (one per connection)", phase_count(l, "tls"), connections);
    v.eq("how TLS is followed", l["tls"]["method"].as_str(), Some("OpenSSL uprobes, handshake from records"));
    v.eq("closed by the peer", l["closed_by_peer"].as_u64(), Some(0));
    v.near(
        "sum of think against the server's own handling (ms)",
        think_ns(l) as f64 / 1e6,
        own["handling_ns"] / 1e6,
        5.0,
        2.0,
    );
    v.finish();
    Ok(())
}
