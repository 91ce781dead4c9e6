//! Request labels (`--labels`) on the lab servers, against the client's own truth: each
//! endpoint's requests, bytes and status classes as the client sent and received them,
//! the stall of a late-read list in its own endpoint's `send`; no byte a terminal would
//! obey in any output, whatever the requests hold; and a table that stays bounded, in
//! size and memory, under 10,000 distinct paths.

use std::{
    collections::BTreeMap,
    io::{BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use tracer_tests::{
    client::{self, ClientOptions, Exchange},
    harness::*,
};

/// How late the slow client reads each response's body: well above the 40 ms of a
/// delayed acknowledgement, which a small response's `delivery` takes while the client
/// sleeps instead of sending.
const READ_DELAY_MS: u64 = 200;
/// The slow client's receive buffer. Left to autotuning (up to `tcp_rmem`'s maximum, 32
/// MB here), a kept-alive connection's grows past the 1.5 MB list after a few, which then
/// waits in the client's socket rather than blocking the server's writes (seen: `send`
/// 14.7 ms, then `delivery` 43.8 ms, for one list read 100 ms late).
const SLOW_RCVBUF: i32 = 64 << 10;

/// A client of the shop; a slow one (`read_delay_ms` > 0) with a receive buffer of
/// [`SLOW_RCVBUF`].
fn shop_client(server: SocketAddr, paths: Vec<String>, read_delay_ms: u64) -> ClientOptions {
    ClientOptions {
        read_delay_ms,
        rcvbuf: if read_delay_ms > 0 { SLOW_RCVBUF } else { 0 },
        paths,
        ..ClientOptions::to(server)
    }
}

/// The label the tracer must give a shop path: the method and route, a product's number
/// folded into `{id}`.
fn shop_label(path: &str) -> &'static str {
    match path {
        "/products" => "GET /products",
        "/productTypes" => "GET /productTypes",
        p if p.starts_with("/products/") => "GET /products/{id}",
        "/nope" => "GET /nope",
        p => panic!("no label for {p}"),
    }
}

/// Connection `c`'s paths in the client-side filtering run: the list and the product
/// types twice, ten products of its own (`c*10+1` to `c*10+10`) and one unknown path.
fn filtering_paths(c: u32) -> Vec<String> {
    let product = |k: u32| format!("/products/{}", c * 10 + k);
    let mut paths = vec!["/products".to_owned(), "/productTypes".to_owned()];
    paths.extend((1..=5).map(product));
    paths.extend(["/nope".to_owned(), "/products".to_owned(), "/productTypes".to_owned()]);
    paths.extend((6..=10).map(product));
    paths
}

/// Each list of paths on its own kept-alive connection, all at once; every exchange.
fn run_connections(server: SocketAddr, connections: Vec<Vec<String>>, read_delay_ms: u64) -> Result<Vec<Exchange>> {
    let handles: Vec<_> = connections
        .into_iter()
        .map(|paths| {
            let opts = shop_client(server, paths, read_delay_ms);
            thread::spawn(move || client::one_connection(&opts))
        })
        .collect();
    let mut exchanges = Vec::new();
    for h in handles {
        exchanges.extend(h.join().expect("client thread")?.exchanges);
    }
    Ok(exchanges)
}

/// What the client sent and received under one label.
#[derive(Debug, Default)]
struct Truth {
    requests: u64,
    bytes_sent: u64,
    bytes_received: u64,
    /// Responses per status class (`"2xx"`, …).
    statuses: BTreeMap<String, u64>,
}

fn truth_by_label(exchanges: &[Exchange]) -> BTreeMap<&'static str, Truth> {
    let mut truth: BTreeMap<&'static str, Truth> = BTreeMap::new();
    for e in exchanges {
        let t = truth.entry(shop_label(&e.target)).or_default();
        t.requests += 1;
        t.bytes_sent += e.bytes_sent;
        t.bytes_received += e.bytes_received;
        *t.statuses.entry(format!("{}xx", e.status / 100)).or_default() += 1;
    }
    truth
}

fn labels_of(l: &Value) -> Vec<String> {
    l["endpoints"].as_array().into_iter().flatten().map(|e| e["label"].as_str().unwrap_or("?").to_owned()).collect()
}

/// The listener's endpoints against the client's exchanges: the same labels, and under
/// each exactly the requests, bytes and status classes the client counted.
fn endpoint_verdicts(v: &mut Verdicts, l: &Value, truth: &BTreeMap<&'static str, Truth>) {
    let mut labels = labels_of(l);
    labels.sort();
    v.eq("labels", labels.clone(), truth.keys().map(|k| k.to_string()).collect::<Vec<_>>());
    v.check(!labels.iter().any(|l| l.contains(|c: char| c.is_ascii_digit())), || {
        format!("a label with a digit (a product's number not folded): {labels:?}")
    });
    for (label, t) in truth {
        let Ok(e) = endpoint_of(l, label) else {
            v.check(false, || format!("no endpoint {label:?}"));
            continue;
        };
        v.eq(&format!("{label}: requests"), e["requests"].as_u64(), Some(t.requests));
        v.eq(&format!("{label}: aborted"), e["aborted"].as_u64(), Some(0));
        v.eq(
            &format!("{label}: bytes_out against the client's bytes received"),
            e["bytes_out"].as_u64(),
            Some(t.bytes_received),
        );
        v.eq(&format!("{label}: bytes_in against the client's bytes sent"), e["bytes_in"].as_u64(), Some(t.bytes_sent));
        v.eq(&format!("{label}: statuses"), e["statuses"].clone(), json!(t.statuses));
        v.eq(&format!("{label}: requests timed (time.count)"), e["phases"]["time"]["count"].as_u64(), Some(t.requests));
    }
}

/// A phase statistic of an endpoint in milliseconds.
fn endpoint_ms(e: &Value, phase: &str, stat: &str) -> f64 {
    e["phases"][phase][stat].as_u64().map_or(f64::NAN, |ns| ns as f64 / 1e6)
}

/// A shop whose client fetches the whole product list to filter it itself: every
/// endpoint's requests, bytes and statuses exactly as the client counted them, products
/// folded into one route; then a client that reads each body late, whose stall is the
/// list's `send` and no other endpoint's; then the text report's endpoint table.
#[test]
fn client_side_filtering() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "shop"])?;
    let port = addr.port();
    let traced = vec!["--pid".to_owned(), server.pid().to_string(), "--labels".to_owned()];

    // 1. Fast clients: counts, bytes and statuses per endpoint.
    let mut args = traced.clone();
    args.extend(["--check".to_owned(), format!(r#"requests[:{port} "GET /products"]==10"#)]);
    let tracer = start_tracer(&args)?;
    let exchanges = run_connections(addr, (0..5).map(filtering_paths).collect(), 0)?;
    let (code, lines) = tracer.stop_with_code()?;
    let report = final_report(&lines)?;
    let l = listener(report, port)?;
    let truth = truth_by_label(&exchanges);
    eprintln!("{}client: {truth:?}\nendpoints: {}", describe(report), l["endpoints"]);
    // The client's side: what was sent, and that the shop answered as it should.
    let sent: Vec<(&str, u64)> = truth.iter().map(|(k, t)| (*k, t.requests)).collect();
    assert_eq!(
        sent,
        [("GET /nope", 5), ("GET /productTypes", 10), ("GET /products", 10), ("GET /products/{id}", 50)],
        "requests the client made"
    );
    assert_eq!(truth["GET /nope"].statuses, BTreeMap::from([("4xx".to_owned(), 5)]));

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &json!(0));
    v.eq("listener requests", l["requests"].as_u64(), Some(exchanges.len() as u64));
    v.eq("listener aborted", l["aborted"].as_u64(), Some(0));
    v.eq("listener bytes_out", l["bytes_out"].as_u64(), Some(exchanges.iter().map(|e| e.bytes_received).sum::<u64>()));
    endpoint_verdicts(&mut v, l, &truth);
    let check = &report["checks"][0];
    v.eq(
        "the labelled check's verdict",
        (check["passed"].as_bool(), check["value"].as_f64()),
        (Some(true), Some(10.0)),
    );
    v.eq("exit status", code, 0);
    v.finish();

    // 2. Clients that read each body 200 ms late: the list, far larger than the shop's
    // send buffer and their receive buffers, blocks the server's writes for about that
    // long (its `send`); every other response fits the buffers and is sent at once (and
    // delivered within a delayed acknowledgement).
    let tracer = start_tracer(&traced)?;
    let slow_paths = |c: u32| -> Vec<String> {
        (0..3)
            .flat_map(|k| {
                [
                    "/products".to_owned(),
                    "/productTypes".to_owned(),
                    format!("/products/{}", 1 + c * 3 + k),
                    "/nope".to_owned(),
                ]
            })
            .collect()
    };
    let exchanges = run_connections(addr, (0..2).map(slow_paths).collect(), READ_DELAY_MS)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, port)?;
    let truth = truth_by_label(&exchanges);
    let mut v = Verdicts::default();
    v.eq("lost events (slow reader)", &report["lost_events"], &json!(0));
    v.eq("listener requests (slow reader)", l["requests"].as_u64(), Some(exchanges.len() as u64));
    endpoint_verdicts(&mut v, l, &truth);
    let products = endpoint_of(l, "GET /products")?;
    let send_p50 = endpoint_ms(products, "send", "p50_ns");
    let out_p50 = send_p50 + endpoint_ms(products, "delivery", "p50_ns");
    let delay = READ_DELAY_MS as f64;
    eprintln!("slow reader: GET /products send p50 {send_p50:.1} ms, send+delivery p50 {out_p50:.1} ms");
    v.check(send_p50 >= 0.9 * delay, || format!("GET /products: send p50 {send_p50:.1} ms, read {delay} ms late"));
    v.check(out_p50 >= 0.9 * delay, || format!("GET /products: send+delivery p50 {out_p50:.1} ms"));
    // Within the list's own time too: the read delay plus moving 1.5 MB, not seconds.
    v.check(out_p50 < 10.0 * delay, || format!("GET /products: send+delivery p50 {out_p50:.1} ms"));
    for e in l["endpoints"].as_array().into_iter().flatten().filter(|e| e["label"] != "GET /products") {
        let label = e["label"].as_str().unwrap_or("?");
        let send = endpoint_ms(e, "send", "p50_ns");
        let out = send + endpoint_ms(e, "delivery", "p50_ns");
        eprintln!("slow reader: {label} send p50 {send:.3} ms, send+delivery p50 {out:.3} ms");
        v.check(send <= send_p50 / 10.0, || {
            format!("{label}: send p50 {send:.3} ms against the list's {send_p50:.1} ms")
        });
        // A small response's delivery may be one delayed acknowledgement (40 ms).
        v.check(out <= out_p50 / 3.0, || {
            format!("{label}: send+delivery p50 {out:.3} ms against the list's {out_p50:.1} ms")
        });
    }
    v.finish();

    // 3. The text report: the endpoint table under the listener, in 80 columns.
    let tracer = start_tracer_output(&traced, "text")?;
    run_connections(addr, (0..5).map(filtering_paths).collect(), 0)?;
    let (code, out) = tracer.stop_raw()?;
    let text = String::from_utf8(out).context("the text report is not UTF-8")?;
    eprintln!("{text}");
    assert_eq!(code, 0, "exit status");
    let row = |label: &str, count: u64| {
        text.lines().any(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let label: Vec<&str> = label.split(' ').collect();
            words.len() > label.len() && words[..label.len()] == label[..] && words[label.len()] == count.to_string()
        })
    };
    assert!(row("GET /products", 10), "no endpoint row `GET /products 10` in the text report");
    assert!(row("GET /products/{id}", 50), "no endpoint row `GET /products/{{id}} 50` in the text report");
    let wide: Vec<&str> = text.lines().filter(|line| line.chars().count() > 80).collect();
    assert!(wide.is_empty(), "lines wider than 80 columns:\n{}", wide.join("\n"));
    Ok(())
}

/// Requests whose first line carries what a terminal obeys or a parser chokes on.
fn hostile_requests() -> Vec<Vec<u8>> {
    let long = format!("/long/{}", "ab".repeat(5_000));
    let lines: Vec<Vec<u8>> = vec![
        b"GET /esc/\x1b[31mred\x1b[0m HTTP/1.1".to_vec(),
        b"GET /title/\x1b]0;pwned\x07x HTTP/1.1".to_vec(),
        b"GET /c1/\xc2\x9b31mred HTTP/1.1".to_vec(),
        b"GET /say/\"quoted\" HTTP/1.1".to_vec(),
        b"GET /back\\slash\\ HTTP/1.1".to_vec(),
        b"GET /nul%00byte HTTP/1.1".to_vec(),
        b"GET /raw\x00nul HTTP/1.1".to_vec(),
        b"GET /bad\xff\xfeutf8 HTTP/1.1".to_vec(),
        b"GET /cut\xe2\x82 HTTP/1.1".to_vec(),
        b"GET /tab\there HTTP/1.1".to_vec(),
        b"GET /del\x7f HTTP/1.1".to_vec(),
        b"GET /cr\rinside HTTP/1.1".to_vec(),
        b"GET /bidi/\xe2\x80\xaeevil HTTP/1.1".to_vec(),
        format!("GET {long} HTTP/1.1").into_bytes(),
        b"G\x1b[1mET /method HTTP/1.1".to_vec(),
    ];
    lines
        .into_iter()
        .map(|mut line| {
            line.extend_from_slice(b"\r\nHost: lab\r\n\r\n");
            line
        })
        .collect()
}

/// Sends `requests` one after another on one connection, reading each response; the
/// statuses.
fn exchange_raw(server: SocketAddr, requests: &[Vec<u8>]) -> Result<Vec<u16>> {
    let stream = TcpStream::connect(server)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    requests
        .iter()
        .map(|r| {
            writer.write_all(r)?;
            Ok(client::read_response_status(&mut reader, 0)
                .with_context(|| format!("response to {:?}", String::from_utf8_lossy(&r[..r.len().min(60)])))?
                .0)
        })
        .collect()
}

/// A byte or character a terminal would act on: C0 and C1 controls and DEL, all but the
/// line feed that ends each line.
fn is_control(c: char) -> bool {
    c != '\n' && c.is_control()
}

/// A label the report may show: short, no control, quote or backslash.
fn label_faults(label: &str) -> Option<String> {
    let bad = label.len() > 96 || label.contains(|c: char| c.is_control() || c == '"' || c == '\\');
    bad.then(|| format!("label of {} bytes {label:?}", label.len()))
}

/// Paths full of escape sequences, quotes, backslashes, NULs, invalid UTF-8, a raw CR
/// and 10 kB: in JSON and in text, with every request printed (`--slow 0ms`), the
/// output holds no control byte but line feeds, each JSON line parses, and every label
/// is at most 96 bytes without a control character, quote or backslash.
#[test]
fn hostile_labels() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&[])?;
    let requests = hostile_requests();
    let sent = 2 * requests.len() as u64;
    let args =
        ["--pid".to_owned(), server.pid().to_string(), "--labels".to_owned(), "--slow".to_owned(), "0ms".to_owned()];
    for format in ["json", "text"] {
        let tracer = start_tracer_output(&args, format)?;
        // Each on a connection of its own (its connection's first read), then all on one.
        let mut statuses = Vec::new();
        for r in &requests {
            statuses.extend(exchange_raw(addr, std::slice::from_ref(r))?);
        }
        statuses.extend(exchange_raw(addr, &requests)?);
        assert!(statuses.iter().all(|&s| s == 200), "the lab server's answers: {statuses:?}");
        let (code, out) = tracer.stop_raw()?;

        let mut v = Verdicts::default();
        v.eq(&format!("{format}: exit status"), code, 0);
        let raw_controls: Vec<(usize, u8)> = out
            .iter()
            .enumerate()
            .filter(|(_, &b)| b != b'\n' && (b < 0x20 || b == 0x7f))
            .map(|(i, &b)| (i, b))
            .collect();
        v.check(raw_controls.is_empty(), || {
            format!(
                "{format}: {} control bytes in the output, first (offset, byte) {:?}",
                raw_controls.len(),
                &raw_controls[..raw_controls.len().min(10)]
            )
        });
        let text = String::from_utf8_lossy(&out);
        v.check(std::str::from_utf8(&out).is_ok(), || format!("{format}: output is not UTF-8"));
        let controls: Vec<String> = text.lines().filter(|l| l.contains(is_control)).map(|l| format!("{l:?}")).collect();
        v.check(controls.is_empty(), || {
            format!("{format}: lines with control characters:\n    {}", controls.join("\n    "))
        });

        if format == "json" {
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line {l:?}")))
                .collect::<Result<_>>()?;
            let report = final_report(&lines)?;
            let l = listener(report, addr.port())?;
            eprintln!("{}endpoints: {}", describe(report), l["endpoints"]);
            v.eq("lost events", &report["lost_events"], &json!(0));
            v.eq("requests", l["requests"].as_u64(), Some(sent));
            v.eq("aborted", l["aborted"].as_u64(), Some(0));
            let endpoints = l["endpoints"].as_array().cloned().unwrap_or_default();
            let labelled: u64 = endpoints.iter().map(|e| e["requests"].as_u64().unwrap_or(0)).sum();
            // All but the request with a mangled method are HTTP requests to label.
            v.check(labelled >= sent - 2 && labelled <= sent, || format!("requests labelled: {labelled} of {sent}"));
            v.check(endpoints.len() >= 5, || {
                format!("{} endpoints for {} distinct paths", endpoints.len(), requests.len())
            });
            let slow: Vec<&Value> = lines.iter().filter(|l| l["type"] == "slow" && l["what"] == "request").collect();
            v.eq("slow request lines (--slow 0ms)", slow.len() as u64, sent);
            let labels = endpoints.iter().map(|e| &e["label"]).chain(slow.iter().map(|s| &s["label"]));
            let faults: Vec<String> = labels.filter_map(|l| l.as_str()).filter_map(label_faults).collect();
            let not_routes: Vec<&str> =
                endpoints.iter().filter_map(|e| e["label"].as_str()).filter(|l| !l.starts_with("GET /")).collect();
            v.check(not_routes.is_empty(), || format!("labels not of a GET route: {not_routes:?}"));
            v.check(faults.is_empty(), || format!("labels:\n    {}", faults.join("\n    ")));
        } else {
            let slow = text.lines().filter(|l| l.starts_with("slow request")).count() as u64;
            v.eq("slow request lines (--slow 0ms)", slow, sent);
            eprintln!(
                "{}",
                text.lines().filter(|l| l.starts_with("slow request")).take(40).collect::<Vec<_>>().join("\n")
            );
        }
        v.finish();
    }
    Ok(())
}

/// Path `i` of the cardinality run: letters only (`/item-aaa`, `/item-aab`, …), so that
/// no segment looks like an identifier to fold.
fn item_path(i: u32) -> String {
    let letter = |k: u32| char::from(b'a' + (i / 26u32.pow(k) % 26) as u8);
    format!("/item-{}{}{}", letter(2), letter(1), letter(0))
}

/// The resident memory of process `pid` in KiB (`VmRSS`).
fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

const PATHS: u32 = 10_000;
const MAX_LABELS: u64 = 50;

/// 10,000 distinct paths on four kept-alive connections to a plain lab server traced
/// with `extra` options: the final report's listener and the tracer's least and most
/// VmRSS in KiB over its last 1.5 s.
fn cardinality_run(extra: &[&str]) -> Result<(Value, (u64, u64))> {
    let (server, addr) = start_lab_server(&[])?;
    let mut args = vec!["--pid".to_owned(), server.pid().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let tracer = start_tracer(&args)?;
    const CONNECTIONS: u32 = 4;
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            thread::spawn(move || -> Result<u32> {
                let stream = TcpStream::connect(addr)?;
                let mut writer = stream.try_clone()?;
                let mut reader = BufReader::new(stream);
                let mut ok = 0;
                for i in (c..PATHS).step_by(CONNECTIONS as usize) {
                    writer.write_all(client::target_request_text(&item_path(i), false).as_bytes())?;
                    ok += u32::from(client::read_response_status(&mut reader, 0)?.0 == 200);
                }
                Ok(ok)
            })
        })
        .collect();
    let mut answered = 0;
    for h in handles {
        answered += h.join().expect("client thread")?;
    }
    assert_eq!(answered, PATHS, "200 answers");
    // The tracer reads its events every 50 ms: let it take in the last before measuring.
    thread::sleep(Duration::from_millis(300));
    // Its resident memory between the TLS scans: each second the tracer reads the traced
    // executable whole (54 MB for the debug lab server), for as long as it parses it, so
    // a single reading lands at random on either side of that.
    let mut rss = Vec::new();
    for _ in 0..150 {
        rss.push(vm_rss_kib(tracer.pid())?);
        thread::sleep(Duration::from_millis(10));
    }
    let memory = (rss.iter().copied().min().unwrap_or(0), rss.iter().copied().max().unwrap_or(0));
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(report["lost_events"], 0, "{report}");
    Ok((listener(report, addr.port())?.clone(), memory))
}

/// 10,000 distinct routes with `--max-labels 50`: 50 labels and `other`, which holds the
/// rest and counts them; and the tracer's memory no more than 10% above a run without
/// labels.
#[test]
fn label_cardinality() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    assert_eq!(item_path(0), "/item-aaa");
    let distinct: std::collections::HashSet<String> = (0..PATHS).map(item_path).collect();
    assert_eq!(distinct.len(), PATHS as usize, "paths are distinct");
    let (plain, plain_memory) = cardinality_run(&[])?;
    let (l, memory) = cardinality_run(&["--labels", "--max-labels", &MAX_LABELS.to_string()])?;
    eprintln!(
        "tracer VmRSS {} KiB with labels, {} KiB without ({:.3}×); most {} KiB, {} KiB",
        memory.0,
        plain_memory.0,
        memory.0 as f64 / plain_memory.0 as f64,
        memory.1,
        plain_memory.1
    );
    let endpoints = l["endpoints"].as_array().cloned().unwrap_or_default();
    let (other, named): (Vec<&Value>, Vec<&Value>) = endpoints.iter().partition(|e| e["label"] == "other");
    let requests = |es: &[&Value]| es.iter().map(|e| e["requests"].as_u64().unwrap_or(0)).sum::<u64>();
    eprintln!(
        "{} labels, other: {}",
        named.len(),
        other.first().map_or(json!(null), |o| json!({"requests": o["requests"], "folded_labels": o["folded_labels"]}))
    );

    let mut v = Verdicts::default();
    v.eq("requests without labels", plain["requests"].as_u64(), Some(PATHS as u64));
    v.check(plain["endpoints"].is_null(), || "endpoints without --labels".into());
    v.eq("requests", l["requests"].as_u64(), Some(PATHS as u64));
    v.eq("labels kept", named.len() as u64, MAX_LABELS);
    v.eq("entries named other", other.len(), 1);
    v.check(named.iter().all(|e| e["requests"] == 1), || "a kept label with other than its one request".into());
    v.eq("requests of the kept labels and other", requests(&named) + requests(&other), PATHS as u64);
    if let Some(o) = other.first() {
        v.eq("other: requests", o["requests"].as_u64(), Some(PATHS as u64 - MAX_LABELS));
        v.eq("other: folded_labels", o["folded_labels"].as_u64(), Some(PATHS as u64 - MAX_LABELS));
        v.eq("other: statuses", o["statuses"].clone(), json!({"2xx": PATHS as u64 - MAX_LABELS}));
    }
    v.check(memory.0 as f64 <= 1.10 * plain_memory.0 as f64, || {
        format!("tracer VmRSS {} KiB with labels > 1.10 × {} KiB without", memory.0, plain_memory.0)
    });
    v.finish();
    Ok(())
}
