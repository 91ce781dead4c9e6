//! An event-loop server: Node.js (Debian's nodejs) serving every request by calling an
//! upstream lab server (20 ms) over HTTP, then working 3 ms on its own, with four
//! clients in flight on its one thread. The truth is the server's own clock
//! (`process.hrtime`): the sum of its upstream calls over the sum of its handling times.

use std::process::Command;

use tracer_tests::{harness::*, load};

const CONNECTIONS: usize = 4;
const REQUESTS: usize = 60;

/// The server: upstream host and port, then the milliseconds of local work per request.
/// A request's handling runs from its `request` event to the return of `res.end()` (which
/// writes the response); its upstream call from `http.request()` to the end of the
/// upstream response. A line on stdin prints the sums.
const SERVER_JS: &str = r#"
const http = require('http');
const [upstreamHost, upstreamPort, localMs] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: true });
let requests = 0, calls = 0, handlingNs = 0n, upstreamNs = 0n;

const server = http.createServer((req, res) => {
  const start = process.hrtime.bigint();
  const call = http.request({ host: upstreamHost, port: upstreamPort, path: '/?size=100', agent }, (up) => {
    up.resume();
    up.on('end', () => {
      upstreamNs += process.hrtime.bigint() - start;
      calls++;
      const until = process.hrtime.bigint() + BigInt(localMs) * 1000000n;
      while (process.hrtime.bigint() < until) {}
      res.writeHead(200, { 'Content-Length': 2 });
      res.end('ok');
      handlingNs += process.hrtime.bigint() - start;
      requests++;
    });
  });
  call.end();
});

server.listen(0, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
process.stdin.on('data', () => {
  console.log(`requests=${requests} calls=${calls} handling_ns=${handlingNs} upstream_ns=${upstreamNs}`);
});
"#;

#[test]
fn node_event_loop_attribution() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_upstream, upstream) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "20"])?;
    let script = std::env::temp_dir().join(format!("tracer-node-{}.js", std::process::id()));
    std::fs::write(&script, SERVER_JS)?;
    let mut node = Command::new("node");
    node.arg(&script).arg(upstream.ip().to_string()).arg(upstream.port().to_string()).arg("3");
    let mut server = start_server_process(node)?;
    // Node has read its script once it listens.
    let _ = std::fs::remove_file(&script);

    let tracer = start_tracer(&["--pid".into(), server.proc.pid().to_string()])?;
    let served = load::run(server.addr, CONNECTIONS, REQUESTS, |_, _| "/".to_owned())?;
    let lines = tracer.stop()?;
    let own = server.ask()?;
    let report = final_report(&lines)?;

    let truth = 100.0 * own["upstream_ns"] / own["handling_ns"];
    let l = listener(report, server.addr.port())?;
    let peer = upstream_peer(report, &upstream.to_string())?;
    let measured = attributed_pct(l, Some(&upstream.to_string()));
    eprintln!("{}server's own: {own:?}: truth {truth:.1}% on the upstream; tracer {measured:.1}%", describe(report));

    // The truth side: every request was served and made its upstream call.
    let total = CONNECTIONS * REQUESTS;
    assert_eq!(served, total);
    assert_eq!(own["requests"], total as f64, "{own:?}");
    assert_eq!(own["calls"], total as f64, "{own:?}");
    assert!(own["handling_ns"] >= total as f64 * 23e6, "each request waits 20 ms and works 3 ms: {own:?}");

    let mut v = http_server_verdicts(report, server.addr.port(), total as u64, own["handling_ns"])?;
    v.eq("upstream exchanges", peer["requests"].as_u64(), Some(total as u64));
    v.near("share of think attributed to the upstream (%) against the server's own", measured, truth, 0.0, 5.0);
    v.finish();
    Ok(())
}
