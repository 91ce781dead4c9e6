//! The `tls` phase against a pause the client injects into its own handshake: nginx
//! from Debian serving HTTPS, the tests' rustls client (tracer_tests::tls_client) on
//! TLS 1.3 and on TLS 1.2. With the tracer attached, first connections that make their
//! handshake at once, then connections whose client holds its flight (after the
//! server's first flight) for 100 ms; each connection sends one request. The server's
//! handshake must be longer by the pause, and the pause must be no request: the
//! handshake's flights are never requests, and no think sample holds the pause.
//!
//! Each group of connections has a tracer run of its own, so that the unpaused
//! handshake the paused one is compared with is the tracer's own figure, taken on the
//! same server the same way. The truth is the client's own timing of each handshake and
//! pause, and nginx's access log (one line per request, with its protocol).
//!
//! Then keep-alive clients that send their close_notify and close the socket only
//! later: the goodbye must be neither a request nor an abort.

use std::{fs, time::Duration};

use anyhow::Result;
use serde_json::Value;
use tracer_tests::{
    harness::*,
    nginx::Nginx,
    tls::TestCert,
    tls_client::{Exchange, TlsClient, TlsVersion},
};

const PAUSE: Duration = Duration::from_millis(100);
const UNPAUSED: usize = 10;
const PAUSED: usize = 20;
const WARM_UP: usize = 3;
/// A think sample this long could hold the pause (which is 100 ms).
const THINK_MAX_MS: f64 = 50.0;

/// The client's handshakes of a run, in ms, for the log.
fn handshakes_ms(exchanges: &[Exchange]) -> String {
    exchanges.iter().map(|e| format!("{:.2}", e.handshake_ms)).collect::<Vec<_>>().join(" ")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// A test per protocol version of a scenario (each skipped without root).
macro_rules! per_version {
    ($tls13:ident, $tls12:ident, $scenario:ident) => {
        #[test]
        fn $tls13() -> Result<()> {
            if !require_root() {
                return Ok(());
            }
            $scenario(TlsVersion::Tls13)
        }

        #[test]
        fn $tls12() -> Result<()> {
            if !require_root() {
                return Ok(());
            }
            $scenario(TlsVersion::Tls12)
        }
    };
}

/// nginx on TLS 1.2 and 1.3 with the tests' certificate, answering `hello` to every
/// request and logging each one's protocol.
fn hello_nginx(cert: &TestCert) -> Result<Nginx> {
    Nginx::start_with(
        1,
        "log_format protocol '$ssl_protocol';\naccess_log access.log protocol;",
        "ssl_protocols TLSv1.2 TLSv1.3;\nlocation / { return 200 \"hello\"; }\n",
        Some(cert),
    )
}

/// The lines of nginx's access log.
fn access_log(nginx: &Nginx) -> Vec<String> {
    fs::read_to_string(nginx.path("access.log")).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// A run of the tracer on nginx around `n` connections that pause `pause`: its final
/// report, the client's exchanges and the access log lines of the run.
fn traced_run(
    nginx: &Nginx,
    client: &TlsClient,
    n: usize,
    pause: Duration,
) -> Result<(Value, Vec<Exchange>, Vec<String>)> {
    let logged = access_log(nginx).len();
    let tracer = start_tracer(&["--pid".into(), nginx.pid().to_string()])?;
    let exchanges: Result<Vec<Exchange>> = (0..n).map(|_| client.exchange(nginx.addr, pause)).collect();
    let lines = tracer.stop()?;
    let exchanges = exchanges?;
    let report = final_report(&lines)?.clone();
    let log = access_log(nginx).split_off(logged);
    Ok((report, exchanges, log))
}

/// The truth side of a run: every response whole, the log naming the protocol once per
/// request, every paused handshake as long as its pause at least.
fn check_truth(exchanges: &[Exchange], log: &[String], n: usize, protocol: &str, pause: Duration) {
    assert_eq!(exchanges.len(), n, "exchanges");
    assert!(exchanges.iter().all(|e| e.status == 200 && e.body_len == "hello".len()), "responses: {exchanges:?}");
    assert_eq!(log.len(), n, "access log lines of the run: {log:?}");
    assert!(log.iter().all(|l| l == protocol), "protocols in the access log: {log:?}");
    let pause_ms = pause.as_secs_f64() * 1e3;
    assert!(exchanges.iter().all(|e| e.paused_ms >= pause_ms), "pauses shorter than {pause_ms} ms: {exchanges:?}");
    assert!(exchanges.iter().all(|e| e.handshake_ms >= pause_ms), "handshakes shorter than the pause: {exchanges:?}");
}

/// The verdicts on a run of `n` connections of one request each.
fn run_verdicts(v: &mut Verdicts, what: &str, report: &Value, port: u16, n: usize, client_handshake_ms: f64) {
    let n = n as u64;
    let Ok(l) = listener(report, port) else {
        v.check(false, || format!("{what}: no listener :{port} in the report"));
        return;
    };
    v.eq(&format!("{what}: lost events"), &report["lost_events"], &serde_json::json!(0));
    v.extend(other_listeners(report, &[port]));
    v.eq(&format!("{what}: requests (one per connection)"), l["requests"].as_u64(), Some(n));
    v.eq(&format!("{what}: timed requests"), phase_count(l, "think"), n);
    v.eq(&format!("{what}: aborted"), l["aborted"].as_u64(), Some(0));
    v.extend(counts_not_adding_up(report));
    v.eq(&format!("{what}: tls samples (one per connection)"), phase_count(l, "tls"), n);
    v.eq(&format!("{what}: how TLS is followed"), l["tls"]["method"].as_str(), Some("OpenSSL uprobes"));
    let think_max = phase_ms(l, "think", "max_ns");
    v.check(think_max < THINK_MAX_MS, || {
        format!("{what}: think's max {think_max:.3} ms: a handshake flight or the pause taken for a request")
    });
    // The server's handshake starts after the client's (at the ClientHello's arrival)
    // and ends with its processing of the client's Finished, which the client sent
    // before its own end: it is no longer than the client's, but for the server's
    // wake-up.
    let tls_p50 = phase_ms(l, "tls", "p50_ns");
    let slack = (client_handshake_ms * 0.05).max(2.0);
    v.check(tls_p50 <= client_handshake_ms + slack, || {
        format!("{what}: tls p50 {tls_p50:.3} ms above the client's median handshake {client_handshake_ms:.3} ms + {slack:.3} ms")
    });
}

fn tls_pause(version: TlsVersion) -> Result<()> {
    let protocol = match version {
        TlsVersion::Tls12 => "TLSv1.2",
        TlsVersion::Tls13 => "TLSv1.3",
    };
    let cert = TestCert::new()?;
    let nginx = hello_nginx(&cert)?;
    let port = nginx.addr.port();
    let client = TlsClient::new(&cert.cert, version)?;
    // Untraced connections first: the first handshakes of a new worker and a new client
    // pay for work done once, which is no part of the handshake compared.
    for _ in 0..WARM_UP {
        client.exchange(nginx.addr, Duration::ZERO)?;
    }

    let (unpaused, unpaused_ex, unpaused_log) = traced_run(&nginx, &client, UNPAUSED, Duration::ZERO)?;
    let (paused, paused_ex, paused_log) = traced_run(&nginx, &client, PAUSED, PAUSE)?;

    let handshakes = |ex: &[Exchange]| median(ex.iter().map(|e| e.handshake_ms).collect());
    let (client_unpaused_ms, client_paused_ms) = (handshakes(&unpaused_ex), handshakes(&paused_ex));
    let pause_ms = median(paused_ex.iter().map(|e| e.paused_ms).collect());
    let (lu, lp) = (listener(&unpaused, port)?, listener(&paused, port)?);
    let (tls_unpaused, tls_paused) = (phase_ms(lu, "tls", "p50_ns"), phase_ms(lp, "tls", "p50_ns"));
    let expected = pause_ms + tls_unpaused;
    eprintln!(
        "{protocol} unpaused:\n{}{protocol} paused:\n{}\
         {protocol}: tracer tls p50 {tls_unpaused:.3} ms unpaused, {tls_paused:.3} ms paused \
         (mean {:.3}, max {:.3}; expected {expected:.3}); think max {:.3} / {:.3} ms\n\
         client: median handshake {client_unpaused_ms:.3} ms unpaused, {client_paused_ms:.3} ms paused \
         (min {:.3}, max {:.3}); median pause {pause_ms:.3} ms; median server flight {:.3} / {:.3} ms\n\
         client handshakes (ms): unpaused [{}], paused [{}]",
        describe(&unpaused),
        describe(&paused),
        phase_ms(lp, "tls", "mean_ns"),
        phase_ms(lp, "tls", "max_ns"),
        phase_ms(lu, "think", "max_ns"),
        phase_ms(lp, "think", "max_ns"),
        paused_ex.iter().map(|e| e.handshake_ms).fold(f64::INFINITY, f64::min),
        paused_ex.iter().map(|e| e.handshake_ms).fold(0.0, f64::max),
        median(unpaused_ex.iter().map(|e| e.server_flight_ms).collect()),
        median(paused_ex.iter().map(|e| e.server_flight_ms).collect()),
        handshakes_ms(&unpaused_ex),
        handshakes_ms(&paused_ex),
    );

    check_truth(&unpaused_ex, &unpaused_log, UNPAUSED, protocol, Duration::ZERO);
    check_truth(&paused_ex, &paused_log, PAUSED, protocol, PAUSE);

    let mut v = Verdicts::default();
    run_verdicts(&mut v, "unpaused", &unpaused, port, UNPAUSED, client_unpaused_ms);
    run_verdicts(&mut v, "paused", &paused, port, PAUSED, client_paused_ms);
    v.near("paused tls p50 against the pause + the unpaused tls p50 (ms)", tls_paused, expected, 5.0, 2.0);
    // Every paused handshake holds the pause: one that did not would take ~5 ms off
    // the mean of 20.
    let tls_mean = phase_ms(lp, "tls", "mean_ns");
    v.check(tls_mean >= pause_ms, || format!("paused tls mean {tls_mean:.3} ms below the pause {pause_ms:.3} ms"));
    v.finish();
    Ok(())
}

per_version!(tls13_pause, tls12_pause, tls_pause);

/// Clients that say goodbye and close late: keep-alive connections whose client sends
/// its close_notify after its last response and closes the socket only `GOODBYE_LINGER`
/// later (as a busy or slow client may), followed through OpenSSL's calls and from the
/// record layer alone. nginx reads the close_notify and closes without an answer: the
/// goodbye is no request and no abort, whatever the time to the client's close.
fn late_goodbye(version: TlsVersion) -> Result<()> {
    const CONNECTIONS: usize = 4;
    const REQUESTS: usize = 3;
    const GOODBYE_LINGER: Duration = Duration::from_millis(150);
    let cert = TestCert::new()?;
    let nginx = hello_nginx(&cert)?;
    let port = nginx.addr.port();
    let client = TlsClient::new(&cert.cert, version)?;
    let mut v = Verdicts::default();
    for uprobes in [true, false] {
        let what = if uprobes { "OpenSSL uprobes" } else { "record layer only" };
        let logged = access_log(&nginx).len();
        let mut args = vec!["--pid".into(), nginx.pid().to_string()];
        if !uprobes {
            args.extend(["--skip-hook-kind".into(), "uprobe".into()]);
        }
        let tracer = start_tracer(&args)?;
        let statuses: Result<Vec<Vec<u16>>> =
            (0..CONNECTIONS).map(|_| client.keep_alive(nginx.addr, REQUESTS, GOODBYE_LINGER)).collect();
        let lines = tracer.stop()?;
        let statuses = statuses?;
        let report = final_report(&lines)?;
        eprintln!("{what}:\n{}", describe(report));
        let n = (CONNECTIONS * REQUESTS) as u64;
        assert!(statuses.iter().flatten().all(|s| *s == 200), "statuses {statuses:?}");
        assert_eq!(access_log(&nginx).len() - logged, n as usize, "access log lines of the run");
        let l = listener(report, port)?;
        v.eq(&format!("{what}: lost events"), &report["lost_events"], &serde_json::json!(0));
        v.eq(&format!("{what}: how TLS is followed"), l["tls"]["method"].as_str(), Some(what));
        v.eq(&format!("{what}: requests"), l["requests"].as_u64(), Some(n));
        v.eq(&format!("{what}: timed requests"), phase_count(l, "think"), n);
        v.eq(&format!("{what}: aborted"), l["aborted"].as_u64(), Some(0));
        v.extend(counts_not_adding_up(report));
    }
    v.finish();
    Ok(())
}

per_version!(tls13_late_goodbye, tls12_late_goodbye, late_goodbye);
