//! Request labels (`--labels`) on real servers, each judged by the server's own record:
//! nginx's access log (static files, a proxied API, 404s), PostgreSQL's statement log
//! (behind the lab's database scenario, and under pgbench on the postmaster), and
//! Redis's command statistics (with and without pipelining).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
    load,
    nginx::Nginx,
    pg::Cluster,
    redis::{self, Redis},
};

/// `--pid PID --labels`: what every test here traces with.
fn labelled(pid: u32) -> Vec<String> {
    vec!["--pid".into(), pid.to_string(), "--labels".into()]
}

/// The labels of a listener's or peer's endpoints.
fn labels(entry: &Value) -> BTreeSet<String> {
    entry["endpoints"].as_array().into_iter().flatten().filter_map(|e| Some(e["label"].as_str()?.to_owned())).collect()
}

/// One line per endpoint: label, requests, statuses, errors, and the p50 of `phase`.
fn describe_endpoints(what: &str, entry: &Value, phase: &str) -> String {
    let mut out = String::new();
    for e in entry["endpoints"].as_array().into_iter().flatten() {
        out += &format!(
            "  {what} {:<32} requests {:>5} aborted {} statuses {} errors {} {phase}.p50 {:.3} ms\n",
            e["label"].as_str().unwrap_or("?"),
            e["requests"],
            e["aborted"],
            e["statuses"],
            e["errors"],
            e["phases"][phase]["p50_ns"].as_u64().unwrap_or(0) as f64 / 1e6
        );
    }
    out
}

// ---------------------------------------------------------------------------------------
// nginx

/// What the label of a request for `uri` should be: the path without its query string,
/// each all-digit segment folded into `{id}`.
fn expected_http_label(method: &str, uri: &str) -> String {
    let path = uri.split_once('?').map_or(uri, |(path, _)| path);
    let route: Vec<&str> = path
        .split('/')
        .map(|s| if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) { "{id}" } else { s })
        .collect();
    format!("{method} {}", route.join("/"))
}

/// Per label, from the access log (`$request_method $request_uri $status`): requests
/// and their status classes.
#[derive(Default, Debug)]
struct LogEndpoint {
    requests: u64,
    classes: BTreeMap<String, u64>,
}

fn access_log_endpoints(text: &str) -> Result<BTreeMap<String, LogEndpoint>> {
    let mut endpoints: BTreeMap<String, LogEndpoint> = BTreeMap::new();
    for line in text.lines() {
        let [method, uri, status] = line.split(' ').collect::<Vec<_>>()[..] else { bail!("bad log line {line:?}") };
        let status: u16 = status.parse().with_context(|| format!("status in {line:?}"))?;
        let e = endpoints.entry(expected_http_label(method, uri)).or_default();
        e.requests += 1;
        *e.classes.entry(format!("{}xx", status / 100)).or_default() += 1;
    }
    Ok(endpoints)
}

const NGINX_CONNECTIONS: usize = 8;
const NGINX_REQUESTS: usize = 150;

/// Request `i` of connection `c`: a static file (with and without a query string), the
/// proxied API (a list, one item by id, a nested id), and paths nginx has not.
fn nginx_path(c: usize, i: usize) -> String {
    match (c * 7 + i) % 10 {
        0..=2 => "/static.txt".into(),
        3 => format!("/static.txt?v={i}"),
        4 | 5 => "/api/items?size=200".into(),
        6 => format!("/api/items/{}?size=50", 100 + c * 1000 + i),
        7 => format!("/api/users/{c}/orders?size=10"),
        8 => format!("/nope/{i}"),
        _ => "/missing.html?x=1".into(),
    }
}

/// nginx serving a static file, proxying `/api/` to a lab server over a keep-alive pool
/// and answering 404 for the rest, ≥ 1,000 requests on kept-alive connections: each
/// endpoint's requests and status classes are what the access log says of the same
/// label, and the lab server (an upstream peer) has an endpoint per proxied route with
/// the proxied requests.
#[test]
fn nginx_endpoints_match_the_access_log() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_lab, lab) = start_lab_server(&[])?;
    let nginx = Nginx::start(
        2,
        &format!(
            "log_format labels '$request_method $request_uri $status';\n\
             access_log access.log labels;\n\
             upstream lab {{ server {lab}; keepalive 8; }}"
        ),
        "location = /static.txt { }\n\
         location /api/ { proxy_pass http://lab; proxy_http_version 1.1; proxy_set_header Connection \"\"; }",
    )?;
    fs::write(nginx.path("www/static.txt"), "s".repeat(1500))?;

    let tracer = start_tracer(&labelled(nginx.pid()))?;
    let served = load::run(nginx.addr, NGINX_CONNECTIONS, NGINX_REQUESTS, nginx_path)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let log_text = fs::read_to_string(nginx.path("access.log"))?;
    let log = access_log_endpoints(&log_text)?;
    let log_lines = log_text.lines().count() as u64;

    let l = listener(report, nginx.addr.port())?;
    let peer = upstream_peer(report, &lab.to_string())?;
    eprint!(
        "{}{}{}",
        describe(report),
        describe_endpoints("nginx", l, "think"),
        describe_endpoints("lab", peer, "upstream")
    );
    eprintln!("access log: {log_lines} lines");
    for (label, e) in &log {
        eprintln!("  log {label:<32} requests {:>5} statuses {:?}", e.requests, e.classes);
    }

    // The truth side: every request was served and logged, and the mix has every kind.
    assert_eq!(served, NGINX_CONNECTIONS * NGINX_REQUESTS);
    assert_eq!(log_lines, served as u64, "access log lines");
    for label in
        ["GET /static.txt", "GET /api/items", "GET /api/items/{id}", "GET /api/users/{id}/orders", "GET /nope/{id}"]
    {
        assert!(log.contains_key(label), "no {label} in the access log");
    }

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &json!(0));
    v.extend(other_listeners(report, &[nginx.addr.port()]));
    v.eq("listener requests against the access log's lines", l["requests"].as_u64(), Some(log_lines));
    v.eq("listener endpoints", labels(l), log.keys().cloned().collect());
    for (label, truth) in &log {
        let Ok(e) = endpoint_of(l, label) else { continue };
        v.eq(&format!("{label}: requests"), e["requests"].as_u64(), Some(truth.requests));
        v.eq(&format!("{label}: aborted"), e["aborted"].as_u64(), Some(0));
        v.eq(&format!("{label}: statuses"), e["statuses"].clone(), json!(truth.classes));
        v.eq(&format!("{label}: timed requests"), e["phases"]["think"]["count"].as_u64(), Some(truth.requests));
    }
    // The proxied routes, as nginx forwards them (`proxy_pass` without a URI keeps the
    // request's), on the lab server's side: one upstream request each.
    let proxied: BTreeMap<&String, &LogEndpoint> =
        log.iter().filter(|(label, _)| label.starts_with("GET /api/")).collect();
    let proxied_total: u64 = proxied.values().map(|e| e.requests).sum();
    v.eq("upstream requests to the lab", peer["requests"].as_u64(), Some(proxied_total));
    v.eq("upstream endpoints", labels(peer), proxied.keys().map(|l| l.to_string()).collect());
    for (label, truth) in &proxied {
        let Ok(e) = endpoint_of(peer, label) else { continue };
        v.eq(&format!("upstream {label}: requests"), e["requests"].as_u64(), Some(truth.requests));
        v.eq(&format!("upstream {label}: statuses"), e["statuses"].clone(), json!({ "2xx": truth.requests }));
        v.eq(&format!("upstream {label}: timed"), e["phases"]["upstream"]["count"].as_u64(), Some(truth.requests));
    }
    v.finish();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// Makes the server log every connection and every statement with its duration
/// (`log_min_duration_statement = 0`: simple queries as `statement:`, the extended
/// protocol's steps as `parse`, `bind` and `execute`), and waits until new backends
/// have the settings.
fn log_every_statement(cluster: &Cluster) -> Result<()> {
    let mut admin = postgres::Client::connect(&cluster.url(), postgres::NoTls)?;
    admin.batch_execute("ALTER SYSTEM SET log_connections = on")?;
    admin.batch_execute("ALTER SYSTEM SET log_min_duration_statement = 0")?;
    admin.batch_execute("SELECT pg_reload_conf()")?;
    drop(admin);
    for _ in 0..250 {
        let mut c = postgres::Client::connect(&cluster.url(), postgres::NoTls)?;
        if c.query_one("SHOW log_min_duration_statement", &[])?.get::<_, String>(0) == "0" {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!("the server on port {} did not take log_min_duration_statement = 0", cluster.port)
}

/// The server's log from byte `start` on.
fn log_since(cluster: &Cluster, start: usize) -> Result<String> {
    let log = fs::read(cluster.log_path())?;
    Ok(String::from_utf8_lossy(&log[start.min(log.len())..]).into_owned())
}

fn log_len(cluster: &Cluster) -> Result<usize> {
    Ok(fs::metadata(cluster.log_path())?.len() as usize)
}

/// `duration: 71.234 ms  statement: …` lines: (milliseconds, what follows the duration).
fn durations(log: &str) -> Vec<(f64, &str)> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("LOG:  duration: ")? + "LOG:  duration: ".len()..];
            let (ms, what) = rest.split_once(" ms  ")?;
            Some((ms.parse().ok()?, what))
        })
        .collect()
}

/// The value at quantile `q` of `values` as the tracer's histograms answer it: the
/// sample of rank ⌈q·n⌉.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The lab's database scenario over a primary with an index and a replica of the same
/// million rows without it (read for one request in four): the replica, traced as an
/// upstream peer of the lab server, has one endpoint, `SELECT items` (the lab's
/// `SELECT v FROM items WHERE k = …`), with the statements the replica logged and an
/// upstream p50 within max(5%, 2 ms) of the replica's own median duration of them; the
/// think attribution names the replica and that label, with the time the replica says
/// it spent.
#[test]
fn postgres_labels_behind_the_lab() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const REQUESTS: u64 = 40;
    let primary = Cluster::start(1_000_000, true)?;
    let replica = Cluster::start(1_000_000, false)?;
    // The rows just written, vacuumed now rather than by autovacuum while the replica
    // scans: its scans then take the same time each, and nothing else competes for the
    // CPUs.
    for cluster in [&primary, &replica] {
        postgres::Client::connect(&cluster.url(), postgres::NoTls)?.batch_execute("VACUUM ANALYZE items")?;
    }
    log_every_statement(&replica)?;
    let log_start = log_len(&replica)?;
    let (backend, addr) = start_database_backend(&primary, &replica)?;
    let tracer = start_tracer(&labelled(backend.pid()))?;
    client::run(&ClientOptions { requests: REQUESTS as usize, ..ClientOptions::to(addr) })?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;

    let log = log_since(&replica, log_start)?;
    let scans: Vec<f64> = durations(&log)
        .into_iter()
        .filter(|(_, what)| what.starts_with("statement: SELECT v FROM items WHERE k = "))
        .map(|(ms, _)| ms)
        .collect();
    let l = listener(report, addr.port())?;
    let p = upstream_peer(report, &primary.addr().to_string())?;
    let r = upstream_peer(report, &replica.addr().to_string())?;
    let truth_p50 = quantile(&scans, 0.5);
    let truth_sum: f64 = scans.iter().sum();
    eprint!(
        "{}{}{}",
        describe(report),
        describe_endpoints("primary", p, "upstream"),
        describe_endpoints("replica", r, "upstream")
    );
    eprintln!(
        "replica's log: {} scans {scans:.1?} ms, median {truth_p50:.3} ms, sum {truth_sum:.3} ms; think attribution {}",
        scans.len(),
        l["think_attribution"]["peers"]
    );
    // The truth side: the replica ran one in four of the lab's queries.
    assert_eq!(scans.len() as u64, REQUESTS / 4, "the replica's scans: {log}");

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &json!(0));
    v.eq("listener requests", l["requests"].as_u64(), Some(REQUESTS));
    // The connection's start-up is no query: one endpoint on each database.
    v.eq("replica's endpoints", labels(r), BTreeSet::from(["SELECT items".to_owned()]));
    v.eq("primary's endpoints", labels(p), BTreeSet::from(["SELECT items".to_owned()]));
    if let Ok(e) = endpoint_of(r, "SELECT items") {
        v.eq("replica SELECT items: requests", e["requests"].as_u64(), Some(scans.len() as u64));
        v.eq("replica SELECT items: errors", e["errors"].as_u64(), Some(0));
        v.eq("replica SELECT items: timed", e["phases"]["upstream"]["count"].as_u64(), Some(scans.len() as u64));
        let p50 = e["phases"]["upstream"]["p50_ns"].as_u64().unwrap_or(u64::MAX) as f64 / 1e6;
        v.near("replica SELECT items: upstream p50 against the replica's median (ms)", p50, truth_p50, 5.0, 2.0);
    }
    if let Ok(e) = endpoint_of(p, "SELECT items") {
        v.eq("primary SELECT items: requests", e["requests"].as_u64(), Some(REQUESTS - scans.len() as u64));
    }
    let waits: Vec<&Value> = l["think_attribution"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["peer"] == replica.addr().to_string() && w["label"] == "SELECT items")
        .collect();
    v.eq("think attribution entries for the replica's SELECT items", waits.len(), 1);
    if let [w] = waits[..] {
        let wait_ms = w["wait_ns"].as_u64().unwrap_or(0) as f64 / 1e6;
        v.near("think waiting on the replica's SELECT items against its durations (ms)", wait_ms, truth_sum, 5.0, 2.0);
    }
    v.finish();
    Ok(())
}

const PGBENCH_CLIENTS: usize = 4;
const PGBENCH_TRANSACTIONS: usize = 500;

/// One traced pgbench run (`-S`, the built-in select-only script, in query `mode`) on
/// the postmaster; the failed verdicts.
fn pgbench_run(cluster: &Cluster, mode: &str) -> Result<Vec<String>> {
    let log_start = log_len(cluster)?;
    let tracer = start_tracer(&labelled(cluster.postmaster_pid()?))?;
    let output = cluster.pgbench(&[
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        &PGBENCH_CLIENTS.to_string(),
        "-j",
        "2",
        "-t",
        &PGBENCH_TRANSACTIONS.to_string(),
    ])?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;

    // pgbench's word.
    let processed = Cluster::pgbench_transactions(&output)?;
    // The server's word: connections, statements run (simple queries and executions of
    // prepared ones), and statements prepared (Parse).
    let log = log_since(cluster, log_start)?;
    let connections = log.lines().filter(|l| l.contains("connection authorized")).count() as u64;
    // Each step's kind (`statement`, `parse`, `bind`, `execute`) and its SQL.
    let steps: Vec<(&str, &str)> = durations(&log)
        .into_iter()
        .filter_map(|(_, what)| {
            let (step, sql) = what.split_once(": ")?;
            Some((step.split(' ').next()?, sql))
        })
        .collect();
    let count = |kinds: &[&str], sql: &str| {
        steps.iter().filter(|(step, text)| kinds.contains(step) && text.starts_with(sql)).count() as u64
    };
    // pgbench's select-only script (`:aid` sent as a literal, or `$1` when prepared).
    const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = ";
    let (statements, accounts_ran) = (count(&["statement", "execute"], ""), count(&["statement", "execute"], SELECT));
    let (parses, accounts_prepared) = (count(&["parse"], ""), count(&["parse"], SELECT));

    let l = listener(report, cluster.port)?;
    eprint!("-M {mode}:\n{}{}", describe(report), describe_endpoints("postgres", l, "think"));
    eprintln!(
        "pgbench: {processed} transactions; server log: {connections} connections, {statements} statements run \
         ({accounts_ran} on pgbench_accounts), {parses} prepared ({accounts_prepared} on pgbench_accounts)"
    );

    // The truth side: every transaction ran, once each, every client connected; with
    // -M prepared each client prepared the select once.
    assert_eq!(processed, (PGBENCH_CLIENTS * PGBENCH_TRANSACTIONS) as u64, "{output}");
    assert_eq!(accounts_ran, processed, "statements on pgbench_accounts in the log");
    assert!(connections > PGBENCH_CLIENTS as u64, "pgbench's clients and its first connection: {log}");
    let expected_prepares = if mode == "prepared" { PGBENCH_CLIENTS as u64 } else { 0 };
    assert_eq!(accounts_prepared, expected_prepares, "Parse messages for pgbench_accounts in the log");

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &json!(0));
    v.eq("connections", l["connections"].as_u64(), Some(connections));
    v.eq("aborted", l["aborted"].as_u64(), Some(0));
    v.eq("closed by the peer (a Terminate per connection)", l["closed_by_peer"].as_u64(), Some(connections));
    // pgbench prepares with PQprepare, a round trip of its own (Parse, Sync) before the
    // first execution: a request for that statement too.
    let label = "SELECT pgbench_accounts";
    match endpoint_of(l, label) {
        Ok(e) => {
            v.eq(
                &format!("-M {mode}: {label} against pgbench's transactions (+ its prepares)"),
                e["requests"].as_u64(),
                Some(processed + accounts_prepared),
            );
            v.eq(&format!("-M {mode}: {label} errors"), e["errors"].as_u64(), Some(0));
            v.eq(&format!("-M {mode}: {label} aborted"), e["aborted"].as_u64(), Some(0));
        }
        Err(e) => v.check(false, || format!("-M {mode}: {e:#}")),
    }
    // Start-up, authentication and Terminate are no queries: the labelled requests are
    // the statements the server ran and prepared, and the listener's requests beyond
    // them the one start-up exchange per connection.
    let labelled: u64 = l["endpoints"].as_array().into_iter().flatten().filter_map(|e| e["requests"].as_u64()).sum();
    v.eq(&format!("-M {mode}: labelled requests against the server's statements"), labelled, statements + parses);
    v.eq(
        &format!("-M {mode}: listener requests against statements + start-ups"),
        l["requests"].as_u64(),
        Some(statements + parses + connections),
    );
    for bogus in
        labels(l).iter().filter(|label| !label.starts_with(|c: char| c.is_ascii_uppercase()) || label.contains('?'))
    {
        v.check(false, || format!("-M {mode}: an endpoint that is no statement: {bogus:?}"));
    }
    Ok(v.into_failures())
}

/// PostgreSQL traced on its postmaster under pgbench's select-only script, with the
/// simple protocol and with prepared statements: `SELECT pgbench_accounts` counts
/// pgbench's transactions (and, prepared, each client's one Parse round trip), and no
/// endpoint stands for a connection's start-up or its Terminate.
#[test]
fn postgres_labels_under_pgbench() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cluster = Cluster::start(0, false)?;
    cluster.pgbench(&["-i", "-q", "-s", "1"])?;
    log_every_statement(&cluster)?;
    let mut v = Verdicts::default();
    for mode in ["simple", "prepared"] {
        v.extend(pgbench_run(&cluster, mode)?);
    }
    v.finish();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Redis

const REDIS_CLIENTS: u32 = 4;

/// Redis traced by its PID under redis-benchmark's GET and SET tests, one command per
/// write and then 16 per write: the `GET` and `SET` endpoints count what Redis's own
/// command statistics count, and the listener every command Redis ran while traced
/// (pipelined ones each, although one read of a pipeline is one timed exchange).
#[test]
fn redis_labels() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let redis = Redis::start()?;
    let mut v = Verdicts::default();
    for (pipeline, requests) in [(1, 2000), (16, 2048)] {
        redis.reset_stats()?;
        let tracer = start_tracer(&labelled(redis.pid))?;
        redis::benchmark(redis.port, "get,set", requests, REDIS_CLIENTS, pipeline)?;
        let lines = tracer.stop()?;
        let report = final_report(&lines)?;
        // Redis's word, since the reset (which counts itself, before tracing started).
        let calls = redis.commandstats()?;
        let ran_traced: u64 = calls.iter().filter(|(name, _)| *name != "CONFIG|RESETSTAT").map(|(_, n)| n).sum();

        let l = listener(report, redis.port)?;
        eprint!("pipeline {pipeline}:\n{}{}", describe(report), describe_endpoints("redis", l, "think"));
        eprintln!("redis commandstats: {calls:?}");
        assert_eq!(
            (calls.get("GET"), calls.get("SET")),
            (Some(&(requests as u64)), Some(&(requests as u64))),
            "redis-benchmark's commands"
        );

        v.eq(&format!("-P {pipeline}: lost events"), &report["lost_events"], &json!(0));
        v.extend(other_listeners(report, &[redis.port]));
        for command in ["GET", "SET"] {
            match endpoint_of(l, command) {
                Ok(e) => {
                    v.eq(
                        &format!("-P {pipeline}: {command} against commandstats"),
                        e["requests"].as_u64(),
                        calls.get(command).copied(),
                    );
                    v.eq(&format!("-P {pipeline}: {command} errors"), e["errors"].as_u64(), Some(0));
                    v.eq(&format!("-P {pipeline}: {command} aborted"), e["aborted"].as_u64(), Some(0));
                }
                Err(e) => v.check(false, || format!("-P {pipeline}: {e:#}")),
            }
        }
        v.eq(
            &format!("-P {pipeline}: listener requests against all commands run"),
            l["requests"].as_u64(),
            Some(ran_traced),
        );
        // Times are per exchange: one per pipeline read (and redis-benchmark asks its two
        // CONFIG GETs in one write), recorded once in each label the exchange holds.
        for command in ["GET", "SET"] {
            let Ok(e) = endpoint_of(l, command) else { continue };
            v.eq(
                &format!("-P {pipeline}: {command} timed exchanges (one per pipeline)"),
                e["phases"]["think"]["count"].as_u64(),
                Some((requests / pipeline) as u64),
            );
        }
    }
    v.finish();
    Ok(())
}
