//! The end of a load run: some clients reset their connection (SO_LINGER 0) while the
//! server is still working on their last request. Every request is then either timed
//! or aborted — never lost between the two — on every listener: nginx as a reverse
//! proxy (whose upstream exchanges for those requests are abandoned, unanswered), a lab
//! server (a thread per connection, blocked in its delay) and a Node.js server (an event
//! loop that keeps reading its connections while a request waits), traced together.
//! The truth: what the test did, nginx's access log (status 499: closed by the client)
//! and Node's own count of responses it could not deliver.

use std::{fs, process::Command, thread, time::Duration};

use tracer_tests::{harness::*, load, nginx::Nginx};

const CONNECTIONS: usize = 6;
const REQUESTS: usize = 20;
/// Connections that reset mid-request, per server.
const RESETS: usize = 4;
const SLOW_MS: u64 = 1000;

/// Answers `GET /?size=N&delay=MS` like the lab server, from a timer; counts the
/// requests it answered and those whose connection closed first, printed when a line
/// arrives on stdin.
const SERVER_JS: &str = r#"
const http = require('http');
let answered = 0, cut = 0;
const server = http.createServer((req, res) => {
  const q = new URL(req.url, 'http://lab').searchParams;
  const size = Number(q.get('size') || 100), delay = Number(q.get('delay') || 0);
  res.on('close', () => { if (!res.writableFinished) cut++; });
  setTimeout(() => {
    if (res.destroyed) return;
    res.writeHead(200, { 'Content-Length': size });
    res.end('x'.repeat(size));
    answered++;
  }, delay);
});
server.listen(0, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
process.stdin.on('data', () => console.log(`answered=${answered} cut=${cut}`));
"#;

/// Every other request waits 10 ms on the server.
fn path(_: usize, i: usize) -> String {
    format!("/?size=100&delay={}", if i % 2 == 0 { 10 } else { 0 })
}

#[test]
fn resets_mid_think_add_up() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_upstream, upstream) = start_lab_server(&[])?;
    let nginx = Nginx::start(
        2,
        &format!("log_format status '$status';\naccess_log access.log status;\nupstream lab {{ server {upstream}; }}"),
        "location / { proxy_pass http://lab; }",
    )?;
    let (lab, lab_addr) = start_lab_server(&[])?;

    let script = std::env::temp_dir().join(format!("tracer-node-resets-{}.js", std::process::id()));
    fs::write(&script, SERVER_JS)?;
    let mut node = Command::new("node");
    node.arg(&script);
    let mut node = start_server_process(node)?;
    // Node has read its script once it listens.
    let _ = fs::remove_file(&script);
    let node_addr = node.addr;

    let mut args = Vec::new();
    for pid in [nginx.pid(), lab.pid(), node.proc.pid()] {
        args.extend(["--pid".to_owned(), pid.to_string()]);
    }
    let tracer = start_tracer(&args)?;
    let slow = format!("/?size=100&delay={SLOW_MS}");
    let served = thread::scope(|s| -> anyhow::Result<usize> {
        let mut resetters = Vec::new();
        for server in [nginx.addr, lab_addr, node_addr] {
            for _ in 0..RESETS {
                // REQUESTS requests like the others, then a slow one, reset 150 ms in.
                let (path0, slow) = (path(0, 0), slow.clone());
                resetters.push(s.spawn(move || {
                    load::reset_mid_request(server, REQUESTS, &path0, &slow, Duration::from_millis(150))
                }));
            }
        }
        let to_nginx = s.spawn(|| load::run(nginx.addr, CONNECTIONS, REQUESTS, path));
        let to_node = s.spawn(|| load::run(node_addr, CONNECTIONS, REQUESTS, path));
        let to_lab = load::run(lab_addr, CONNECTIONS, REQUESTS, path)?;
        for r in resetters {
            r.join().expect("resetting client")?;
        }
        Ok(to_lab + to_nginx.join().expect("load")? + to_node.join().expect("load")?)
    })?;
    // The servers finish the slow requests (the lab's answers meet closed connections).
    thread::sleep(Duration::from_millis(SLOW_MS + 200));
    let lines = tracer.stop()?;
    let own = node.ask()?;
    let report = final_report(&lines)?;
    let log = fs::read_to_string(nginx.path("access.log"))?;
    let statuses: Vec<&str> = log.lines().collect();
    let cut = statuses.iter().filter(|&&s| s == "499").count();
    eprintln!(
        "{}nginx's log: {} requests, {cut} closed by the client (499); node's own: {own:?}",
        describe(report),
        statuses.len()
    );

    // The truth side: all normal requests answered; nginx saw each reset as a client
    // closing mid-request and logged every request; Node saw each as a response it
    // could not deliver.
    let each = (CONNECTIONS + RESETS) * REQUESTS;
    assert_eq!(served, 3 * CONNECTIONS * REQUESTS);
    assert_eq!(cut, RESETS, "{statuses:?}");
    assert_eq!(statuses.len(), each + RESETS, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == "200").count(), each, "{statuses:?}");
    assert_eq!((own["answered"], own["cut"]), (each as f64, RESETS as f64), "node's own counts");

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    for (name, port) in [("nginx", nginx.addr.port()), ("lab", lab_addr.port()), ("node", node_addr.port())] {
        let l = listener(report, port)?;
        v.eq(&format!("{name}: requests"), l["requests"].as_u64(), Some((each + RESETS) as u64));
        v.eq(&format!("{name}: timed requests"), phase_count(l, "think"), each as u64);
        v.eq(&format!("{name}: aborted (the resets)"), l["aborted"].as_u64(), Some(RESETS as u64));
        v.eq(&format!("{name}: resets received"), l["resets_received"].as_u64(), Some(RESETS as u64));
        v.eq(&format!("{name}: closed by the peer"), l["closed_by_peer"].as_u64(), Some(0));
    }
    v.extend(other_listeners(report, &[nginx.addr.port(), lab_addr.port(), node_addr.port()]));
    // nginx gave up the upstream exchange of each request cut short.
    let peer = upstream_peer(report, &upstream.to_string())?;
    v.eq("upstream exchanges", peer["requests"].as_u64(), Some((each + RESETS) as u64));
    v.eq("unanswered upstream exchanges", peer["unanswered"].as_u64(), Some(cut as u64));
    v.extend(counts_not_adding_up(report));
    v.finish();
    Ok(())
}
