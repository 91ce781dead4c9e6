//! nginx from Debian serving HTTPS and proxying every request over TLS to a second,
//! untraced nginx (the TLS backend), which proxies it to a lab upstream that waits a
//! known delay. The traced nginx is a TLS client there: its upstream peer must show one
//! TLS handshake per upstream connection and an upstream wait of the backend's delay,
//! with no handshake flight counted as an upstream request.

use std::fs;

use tracer_tests::{
    harness::*,
    nginx::Nginx,
    tls::{curl, TestCert},
};

const DELAY_MS: u64 = 50;
const REQUESTS: usize = 40;

/// `uprobes`: through OpenSSL's calls, else from the records alone; `version`: the
/// protocol nginx speaks to the backend.
fn tls_upstream(uprobes: bool, version: &str) -> anyhow::Result<()> {
    let cert = TestCert::new()?;
    let (_lab, lab) = start_lab_server(&[])?;
    let backend = Nginx::start_with(
        1,
        &format!(
            "log_format timing '$request_time $upstream_response_time';\n\
             access_log access.log timing;\nupstream lab {{ server {lab}; }}"
        ),
        "ssl_protocols TLSv1.2 TLSv1.3;\nlocation / { proxy_pass http://lab; }\n",
        Some(&cert),
    )?;
    let front = Nginx::start_with(
        1,
        "log_format timing '$request_time $upstream_response_time';\naccess_log access.log timing;",
        &format!(
            "ssl_protocols TLSv1.3;\nlocation / {{ proxy_pass https://{}; proxy_ssl_protocols {version}; }}\n",
            backend.addr
        ),
        Some(&cert),
    )?;
    let mut args = vec!["--pid".into(), front.pid().to_string()];
    if !uprobes {
        args.extend(["--skip-hook-kind".into(), "uprobe".into()]);
    }
    let tracer = start_tracer(&args)?;
    let url = format!("https://{}/?size=200&delay={DELAY_MS}", front.addr);
    let transfers = curl(&vec![url; REQUESTS], false, "--tlsv1.3")?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let backend_log = fs::read_to_string(backend.path("access.log"))?;
    // What the backend took per request: the truth for the front's upstream wait.
    let backend_ms: Vec<f64> =
        backend_log.lines().filter_map(|l| l.split(' ').next()?.parse::<f64>().ok()).map(|s| s * 1e3).collect();
    let backend_mean = backend_ms.iter().sum::<f64>() / backend_ms.len() as f64;
    let backend_median = {
        let mut sorted = backend_ms.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let l = listener(report, front.addr.port())?;
    let peer = upstream_peer(report, &backend.addr.to_string())?;
    eprintln!("{}backend: {} requests, mean $request_time {backend_mean:.2} ms", describe(report), backend_ms.len());

    assert!(transfers.iter().all(|t| t.status == 200), "statuses {transfers:?}");
    assert_eq!(backend_ms.len(), REQUESTS, "backend access log lines");

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    v.eq("requests", l["requests"].as_u64(), Some(REQUESTS as u64));
    v.eq("aborted", l["aborted"].as_u64(), Some(0));
    v.extend(counts_not_adding_up(report));
    v.eq("upstream requests (one per request)", peer["requests"].as_u64(), Some(REQUESTS as u64));
    v.eq("unanswered upstream requests", peer["unanswered"].as_u64(), Some(0));
    let connections = peer["connections"].as_u64().unwrap_or(0);
    v.check(connections >= 1, || "no upstream connection".into());
    v.eq("upstream tls samples (one per connection)", peer["phases"]["tls"]["count"].as_u64(), Some(connections));
    v.eq("upstream samples", peer["phases"]["upstream"]["count"].as_u64(), Some(REQUESTS as u64));
    let upstream_p50 = peer["phases"]["upstream"]["p50_ns"].as_u64().unwrap_or(0) as f64 / 1e6;
    // From the records alone, a TLS 1.3 server's session tickets arrive after a new
    // connection's first request and end its wait (the README says so): only TLS 1.2
    // is judged there.
    // The backend's own clock: its median `$request_time` (the injected delay and its
    // own work, whole milliseconds).
    if uprobes || version == "TLSv1.2" {
        v.near("upstream p50 against the backend's median $request_time (ms)", upstream_p50, backend_median, 5.0, 1.0);
        v.check(upstream_p50 >= DELAY_MS as f64, || format!("upstream p50 {upstream_p50:.2} ms below the delay"));
    }
    // The front's own clock bounds every wait from above: its `$upstream_response_time`
    // runs from connecting to the backend to the response's last byte (whole
    // milliseconds), which holds the wait from the request's write to the first byte.
    // The backend's clock cannot: a scheduling delay before it reads the request is
    // in the front's wait and not in the backend's `$request_time`.
    let front_log = fs::read_to_string(front.path("access.log"))?;
    let front_upstream_max =
        front_log.lines().filter_map(|l| l.split(' ').nth(1)?.parse::<f64>().ok()).map(|s| s * 1e3).fold(0.0, f64::max);
    let upstream_max = peer["phases"]["upstream"]["max_ns"].as_u64().unwrap_or(0) as f64 / 1e6;
    v.check(upstream_max <= front_upstream_max + 1.0, || {
        format!("upstream max {upstream_max:.2} ms beyond the front's slowest $upstream_response_time {front_upstream_max:.0} ms")
    });
    v.extend(attribution_over_think(report));
    v.finish();
    Ok(())
}

#[test]
fn nginx_tls_upstream_through_openssl() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    tls_upstream(true, "TLSv1.3")?;
    tls_upstream(true, "TLSv1.2")
}

#[test]
fn nginx_tls_upstream_from_the_records() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    tls_upstream(false, "TLSv1.2")?;
    tls_upstream(false, "TLSv1.3")
}
