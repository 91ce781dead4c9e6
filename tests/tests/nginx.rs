//! A real server: nginx from Debian's packages, two workers, traced by its master's PID.
//! Every request is counted under the right listener with the bytes the client saw.

use std::fs;

use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
    nginx::Nginx,
};

#[test]
fn nginx_requests_and_bytes_match_the_client() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let nginx = Nginx::start(2, "access_log off;", "")?;
    fs::write(nginx.path("www/index.html"), "x".repeat(4321))?;
    let port = nginx.addr.port();

    let tracer = start_tracer(&["--pid".into(), nginx.pid().to_string()])?;
    let results = client::run(&ClientOptions {
        server: nginx.addr,
        connections: 8,
        requests: 25,
        size: 0,
        parallel: true,
        read_delay_ms: 0,
        rcvbuf: 0,
        pause_after_connect_ms: 0,
        paths: Vec::new(),
    })?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, port)?;
    let sent: u64 = results.iter().map(|r| r.bytes_sent).sum();
    let received: u64 = results.iter().map(|r| r.bytes_received).sum();
    assert_eq!(l["connections"], 8, "{l}");
    assert_eq!(l["requests"], 200, "{l}");
    assert_eq!(l["bytes_in"], sent, "{l}");
    assert_eq!(l["bytes_out"], received, "{l}");
    assert_eq!(phase_count(l, "think"), 200, "{l}");
    assert_eq!(report["listeners"].as_array().unwrap().len(), 1, "{report}");
    Ok(())
}
