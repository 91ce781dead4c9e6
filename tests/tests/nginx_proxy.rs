//! nginx from Debian as a reverse proxy (two workers) over a lab upstream on which one
//! request in four waits 80 ms, with an upstream keep-alive pool and without one. The
//! truth is nginx's own access log: the requests it served, and the share of their time
//! spent on the upstream (`$upstream_response_time` over `$request_time`).

use std::fs;

use tracer_tests::{harness::*, load, nginx::Nginx};

const CONNECTIONS: usize = 8;
const REQUESTS: usize = 40;
const SLOW_MS: u64 = 80;

/// What nginx's access log (`$status $arg_delay $request_time $upstream_response_time`)
/// says.
struct AccessLog {
    lines: usize,
    statuses: Vec<u16>,
    /// Sum of `$request_time`, seconds.
    request_s: f64,
    /// Sum of `$upstream_response_time`, seconds (every upstream attempt of a request).
    upstream_s: f64,
    /// `$request_time` of the requests that asked for the delay.
    slow: Vec<f64>,
}

fn read_access_log(text: &str) -> anyhow::Result<AccessLog> {
    let mut log = AccessLog { lines: 0, statuses: Vec::new(), request_s: 0.0, upstream_s: 0.0, slow: Vec::new() };
    for line in text.lines() {
        let fields: Vec<&str> = line.splitn(4, ' ').collect();
        let [status, delay, request, upstream] = fields[..] else { anyhow::bail!("bad log line {line:?}") };
        let request: f64 = request.parse()?;
        log.lines += 1;
        log.statuses.push(status.parse()?);
        log.request_s += request;
        if delay != "-" {
            log.slow.push(request);
        }
        // Several attempts are listed as "a, b" (and redirects as "a : b"); "-" is none.
        log.upstream_s += upstream.split([',', ':', ' ']).filter_map(|t| t.trim().parse::<f64>().ok()).sum::<f64>();
    }
    Ok(log)
}

fn proxy(keepalive_pool: bool) -> anyhow::Result<()> {
    let (_lab, lab) = start_lab_server(&[])?;
    let (upstream_block, location) = if keepalive_pool {
        (
            format!("upstream lab {{ server {lab}; keepalive 8; }}"),
            "location / { proxy_pass http://lab; proxy_http_version 1.1; proxy_set_header Connection \"\"; }",
        )
    } else {
        (format!("upstream lab {{ server {lab}; }}"), "location / { proxy_pass http://lab; }")
    };
    let nginx = Nginx::start(
        2,
        &format!(
            "log_format timing '$status $arg_delay $request_time $upstream_response_time';\n\
             access_log access.log timing;\n{upstream_block}"
        ),
        location,
    )?;

    let tracer = start_tracer(&["--pid".into(), nginx.pid().to_string()])?;
    // One request in four waits SLOW_MS on the lab server: request i of connection c
    // when i ≡ c (mod 4), so the slow ones spread over the connections and in time.
    let served = load::run(nginx.addr, CONNECTIONS, REQUESTS, |c, i| {
        if i % 4 == c % 4 {
            format!("/?size=100&delay={SLOW_MS}")
        } else {
            "/?size=100".to_owned()
        }
    })?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let log = read_access_log(&fs::read_to_string(nginx.path("access.log"))?)?;

    let truth = 100.0 * log.upstream_s / log.request_s;
    let l = listener(report, nginx.addr.port())?;
    let peer = upstream_peer(report, &lab.to_string())?;
    let measured = attributed_pct(l, Some(&lab.to_string()));
    eprintln!(
        "{}access log: {} lines, {} slow, request_time {:.3} s, upstream_response_time {:.3} s: truth {truth:.1}% \
         on the upstream; tracer {measured:.1}%",
        describe(report),
        log.lines,
        log.slow.len(),
        log.request_s,
        log.upstream_s
    );

    // The truth side: every request was served and logged, the injected delays happened
    // (nginx's times are whole milliseconds, each end rounded down).
    let total = CONNECTIONS * REQUESTS;
    assert_eq!(served, total);
    assert_eq!(log.lines, total, "access log lines");
    assert!(log.statuses.iter().all(|&s| s == 200), "statuses {:?}", log.statuses);
    assert_eq!(log.slow.len(), total / 4, "requests that asked for the delay");
    assert!(log.slow.iter().all(|&t| t >= (SLOW_MS - 1) as f64 / 1e3), "slow requests' times {:?}", log.slow);

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    v.extend(other_listeners(report, &[nginx.addr.port()]));
    v.eq("requests against the access log", l["requests"].as_u64(), Some(log.lines as u64));
    v.eq("timed requests against the access log", phase_count(l, "think"), log.lines as u64);
    // HTTP clients close after their last response: no message left unanswered.
    v.eq("closed by the peer", l["closed_by_peer"].as_u64(), Some(0));
    v.extend(counts_not_adding_up(report));
    v.eq("upstream exchanges (one per request)", peer["requests"].as_u64(), Some(log.lines as u64));
    let opened = peer["connections"].as_u64().unwrap_or(0);
    if keepalive_pool {
        // At most 8 in flight per worker and 8 idle kept per worker.
        v.check((1..=16).contains(&opened), || format!("the pool's upstream connections: {opened}"));
    } else {
        v.eq("upstream connections (one per request)", opened, log.lines as u64);
    }
    // Think is nginx's own time per request, within 5%.
    v.near("sum of think against $request_time (ms)", think_ns(l) as f64 / 1e6, log.request_s * 1e3, 5.0, 2.0);
    v.extend(attribution_over_think(report));
    v.near("share of think attributed to the upstream (%) against nginx's own", measured, truth, 0.0, 5.0);
    v.finish();
    Ok(())
}

#[test]
fn nginx_proxy_attribution_with_keepalive_pool() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    proxy(true)
}

#[test]
fn nginx_proxy_attribution_without_pool() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    proxy(false)
}
