//! nginx from Debian serving HTTPS (the tests' own certificate) on TLS 1.2 and TLS 1.3,
//! each request proxied to a lab upstream that waits a known delay: 40 requests on new
//! connections and 40 on one keep-alive connection, from curl. The truth is nginx's
//! access log (its requests and `$request_time`) and curl's own timing of each TLS
//! handshake. Each runs twice: through OpenSSL's calls (uprobes), then from the record
//! layer alone (`--skip-hook-kind uprobe`), as for a server whose TLS has no hook.

use std::fs;

use tracer_tests::{
    harness::*,
    nginx::Nginx,
    tls::{curl, TestCert},
};

const DELAY_MS: u64 = 40;
const REQUESTS: usize = 40;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn https(version: &str, uprobes: bool) -> anyhow::Result<()> {
    let cert = TestCert::new()?;
    let (_lab, lab) = start_lab_server(&[])?;
    let nginx = Nginx::start_with(
        1,
        &format!(
            "log_format timing '$request_time $ssl_protocol $connection';\n\
             access_log access.log timing;\nupstream lab {{ server {lab}; }}"
        ),
        &format!("ssl_protocols {version};\nlocation / {{ proxy_pass http://lab; }}\n"),
        Some(&cert),
    )?;
    let mut args = vec!["--pid".into(), nginx.pid().to_string(), "--connections".into(), "--labels".into()];
    if !uprobes {
        args.extend(["--skip-hook-kind".into(), "uprobe".into()]);
    }
    let tracer = start_tracer(&args)?;
    let curl_version = if version == "TLSv1.3" { "--tlsv1.3" } else { "--tlsv1.2" };
    let url = format!("https://{}/?size=200&delay={DELAY_MS}", nginx.addr);
    let urls = vec![url; REQUESTS];
    let fresh = curl(&urls, true, curl_version)?;
    let reused = curl(&urls, false, curl_version)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let log = fs::read_to_string(nginx.path("access.log"))?;
    let entries: Vec<(f64, String, u64)> = log
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0].parse().unwrap_or(f64::NAN), f[1].to_owned(), f[2].parse().unwrap_or(0))
        })
        .collect();
    let l = listener(report, nginx.addr.port())?;
    let handshakes: Vec<f64> = fresh.iter().chain(&reused).filter_map(|t| t.handshake_ms()).collect();
    let curl_tls_ms = handshakes.iter().sum::<f64>() / handshakes.len() as f64;
    let request_time_ms = median(entries.iter().map(|e| e.0 * 1e3).collect());
    let connections = {
        let mut c: Vec<u64> = entries.iter().map(|e| e.2).collect();
        c.sort();
        c.dedup();
        c.len() as u64
    };
    eprintln!(
        "{}access log: {} requests on {connections} connections, median $request_time {request_time_ms:.1} ms; \
         curl: {} handshakes, mean {curl_tls_ms:.2} ms",
        describe(report),
        entries.len(),
        handshakes.len()
    );

    // The truth side.
    assert!(fresh.iter().chain(&reused).all(|t| t.status == 200), "statuses {fresh:?} {reused:?}");
    assert_eq!(entries.len(), 2 * REQUESTS, "access log lines");
    assert!(entries.iter().all(|e| e.1 == version), "protocols in the access log: {log}");
    assert_eq!(connections, REQUESTS as u64 + 1, "connections in the access log");
    assert_eq!(handshakes.len(), REQUESTS + 1, "handshakes curl made");

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    v.extend(other_listeners(report, &[nginx.addr.port()]));
    v.eq("requests against the access log", l["requests"].as_u64(), Some(entries.len() as u64));
    v.eq("timed requests against the access log", phase_count(l, "think"), entries.len() as u64);
    // Every request's arrival is known, also one the library read with the client's
    // Finished and handed over later from its buffer.
    v.eq("requests with a recv_wait", phase_count(l, "recv_wait"), entries.len() as u64);
    v.eq("aborted", l["aborted"].as_u64(), Some(0));
    // Through the library a close_notify is no message; from the records alone the
    // keep-alive connection's last one is read, and is the peer's goodbye.
    let goodbyes = l["closed_by_peer"].as_u64().unwrap_or(u64::MAX);
    v.check(goodbyes == 0 || (!uprobes && goodbyes == 1), || format!("closed by the peer: {goodbyes}"));
    v.extend(counts_not_adding_up(report));
    v.near(
        "think p50 against the median $request_time (ms)",
        phase_ms(l, "think", "p50_ns"),
        request_time_ms,
        5.0,
        2.0,
    );
    // Through the library no upstream wait is ever charged to send. From the records
    // alone, a TLS 1.3 session ticket written after the request was read (nginx reads a
    // client's Finished and its request at once) ends think early: the report says so.
    // Send is the response's encryption and socket writes: well under a millisecond for
    // nine in ten requests; its longest is bounded by a quarter of the upstream delay (a
    // preempted worker can take a millisecond or two; an upstream wait charged to send
    // would take 40 ms).
    let send_max = phase_ms(l, "send", "max_ns");
    let send_p90 = phase_ms(l, "send", "p90_ns");
    if uprobes {
        v.check(send_p90 < 1.0, || format!("send's p90 {send_p90:.3} ms"));
        v.check(send_max < DELAY_MS as f64 / 4.0, || {
            format!("send's max {send_max:.3} ms: an upstream wait charged to send")
        });
    } else {
        let said = l["tls"]["approximate"].as_str().unwrap_or("");
        v.check(said.contains("ticket"), || format!("the tickets' effect on think unsaid: {said:?}"));
    }
    v.eq("tls samples (one per connection)", phase_count(l, "tls"), connections);
    let tls_mean = phase_ms(l, "tls", "mean_ns");
    v.check(tls_mean >= 0.3 * curl_tls_ms && tls_mean <= 1.05 * curl_tls_ms, || {
        format!("tls mean {tls_mean:.3} ms against curl's handshakes, {curl_tls_ms:.3} ms (0.3× to 1.05×)")
    });
    let method = if uprobes { "OpenSSL uprobes" } else { "record layer only" };
    v.eq("how TLS is followed", l["tls"]["method"].as_str(), Some(method));
    v.check(uprobes || l["tls"]["approximate"].is_string(), || "the record layer's approximations unsaid".into());
    // Every connection of the first batch carried exactly one request; the keep-alive one
    // all of the second batch's.
    let mut per_connection: Vec<u64> = lines
        .iter()
        .filter(|v| v["type"] == "connection")
        .map(|c| c["requests"].as_u64().unwrap_or(u64::MAX))
        .collect();
    per_connection.sort();
    let mut expected = vec![1; REQUESTS];
    expected.push(REQUESTS as u64);
    v.eq("requests per connection", per_connection, expected);
    // Labels: through the library, from the plaintext (nginx's responses, and the
    // requests of its plain-HTTP upstream); from the records alone the server side is
    // ciphertext, unlabelled.
    let endpoints: Vec<(String, u64, u64)> = l["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(u64::MAX);
                    (e["label"].as_str().unwrap_or("?").to_owned(), n(&e["requests"]), n(&e["statuses"]["2xx"]))
                })
                .collect()
        })
        .unwrap_or_default();
    let n = entries.len() as u64;
    let expected: Vec<(String, u64, u64)> = if uprobes { vec![("GET /".into(), n, n)] } else { vec![] };
    v.eq("endpoints (label, requests, 2xx)", endpoints, expected);
    let upstream = upstream_peer(report, &lab.to_string())?;
    v.eq("the upstream's endpoint GET /", endpoint_of(upstream, "GET /")?["requests"].as_u64(), Some(n));
    v.finish();
    Ok(())
}

#[test]
fn nginx_https_tls12() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    https("TLSv1.2", true)?;
    https("TLSv1.2", false)
}

#[test]
fn nginx_https_tls13() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    https("TLSv1.3", true)?;
    https("TLSv1.3", false)
}
