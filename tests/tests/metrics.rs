//! Prometheus scraping the tracer (`--metrics-addr`): Debian's Prometheus, started on a
//! free loopback port with a scrape interval of one second, scrapes the tracer while a
//! lab server that thinks a known 20 ms serves 240 requests. Prometheus's own
//! `histogram_quantile` over the think histogram must land in the bucket that holds
//! 20 ms, the request counter it stored must equal the tracer's final report exactly,
//! and the target must be up with no scrape error. With native histograms on at both
//! ends (`--native-histograms`, `--enable-feature=native-histograms`), Prometheus
//! scrapes the protobuf format, and its quantile over the native think histogram must
//! land in the native bucket that holds the think time.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use tracer_tests::harness::*;

const DELAY_MS: u64 = 20;
const CONNECTIONS: usize = 4;
const REQUESTS: usize = 60;

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A Prometheus of the test's own: its configuration and storage in a directory of
/// its own, stopped and removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Scraping `target` every second, with these `--enable-feature`s.
    fn start(target: u16, features: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("tracer-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )?;
        let port = free_port()?;
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(features.iter().map(|f| format!("--enable-feature={f}")))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("prometheus.log"))?)
            .spawn()
            .context("starting /usr/bin/prometheus (installed by `cargo xtask setup`)")?;
        let prometheus = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while prometheus.get("/-/ready").is_err() {
            if Instant::now() > deadline {
                bail!("Prometheus not ready within 60 s: {}", prometheus.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` from Prometheus's web API; the body.
    fn get(&self, path: &str) -> Result<String> {
        let out = Command::new("curl").args(["-sSf", &format!("http://127.0.0.1:{}{path}", self.port)]).output()?;
        if !out.status.success() {
            bail!("GET {path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The value of an instant PromQL query with one result; None when it has none.
    fn query(&self, promql: &str) -> Result<Option<f64>> {
        let out = Command::new("curl")
            .args(["-sSfG", &format!("http://127.0.0.1:{}/api/v1/query", self.port), "--data-urlencode"])
            .arg(format!("query={promql}"))
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("query {promql}"))?;
        if v["status"] != "success" {
            bail!("query {promql}: {v}");
        }
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(one["value"][1].as_str().and_then(|s| s.parse().ok())),
            _ => bail!("query {promql}: {} results: {v}", result.len()),
        }
    }

    /// Waits until `promql` gives a value for which `done` holds (within `timeout`).
    fn wait_for(&self, promql: &str, timeout: Duration, done: impl Fn(f64) -> bool) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.query(promql)?;
            if let Some(v) = value.filter(|v| done(*v)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("{promql} is {value:?} after {timeout:?}; Prometheus said: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A lab server thinking `delay_ms` per request, traced with `--metrics-addr` (and
/// `tracer_args`), scraped by a Prometheus with `features`, through
/// CONNECTIONS × REQUESTS requests and one more scrape after them.
struct Scraped {
    _server: Proc,
    addr: std::net::SocketAddr,
    tracer: Tracer,
    prometheus: Prometheus,
    /// The requests sent, and the request counter Prometheus stored.
    sent: f64,
    stored: f64,
}

fn scraped(delay_ms: u64, tracer_args: &[&str], features: &[&str]) -> Result<Scraped> {
    let (server, addr) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", &delay_ms.to_string()])?;
    let metrics_port = free_port()?;
    let mut args = vec!["--pid".into(), server.pid().to_string(), "--metrics-addr".into()];
    args.push(format!("127.0.0.1:{metrics_port}"));
    args.extend(tracer_args.iter().map(|a| a.to_string()));
    let tracer = start_tracer(&args)?;
    let prometheus = Prometheus::start(metrics_port, features)?;
    prometheus.wait_for("up{job=\"tracer\"}", Duration::from_secs(30), |v| v == 1.0)?;
    let (connections, requests) = (CONNECTIONS.to_string(), REQUESTS.to_string());
    let client = ["--server", &addr.to_string(), "--connections", &connections, "--requests", &requests, "--parallel"];
    run_lab_client(None, &client)?;
    let sent = (CONNECTIONS * REQUESTS) as f64;
    // A listener is named by the address its socket is bound to.
    let counter = format!("tracer_requests_total{{listener=\"{addr}\"}}");
    prometheus.wait_for(&counter, Duration::from_secs(30), |v| v >= sent)?;
    // One more scrape after the last request was counted, then the tracer stops.
    std::thread::sleep(Duration::from_millis(2_500));
    let stored = prometheus.query(&counter)?.context("no request counter stored")?;
    Ok(Scraped { _server: server, addr, tracer, prometheus, sent, stored })
}

#[test]
fn prometheus_scrapes_the_phases_and_counts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let Scraped { _server, addr, tracer, prometheus, sent, stored } = scraped(DELAY_MS, &[], &[])?;
    let quantile = prometheus
        .query(&format!(
            "histogram_quantile(0.5, sum by (le) (tracer_request_phase_seconds_bucket{{listener=\"{addr}\",phase=\"think\"}}))"
        ))?
        .context("no think histogram stored")?;
    let targets: Value = serde_json::from_str(&prometheus.get("/api/v1/targets")?)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    eprintln!(
        "{}Prometheus: requests {stored}, think p50 {:.2} ms (histogram_quantile); targets {}",
        describe(report),
        quantile * 1e3,
        targets["data"]["activeTargets"]
    );

    let mut v = Verdicts::default();
    v.eq("requests in the final report", l["requests"].as_f64(), Some(sent));
    v.eq("requests Prometheus stored against the final report", Some(stored), l["requests"].as_f64());
    // The bucket of BUCKETS_S that holds 20 ms: (10 ms, 25 ms].
    v.check(quantile > 0.010 && quantile <= 0.025, || {
        format!("histogram_quantile(0.5) of think {quantile} s, not in the bucket (0.01, 0.025] holding {DELAY_MS} ms")
    });
    let target = &targets["data"]["activeTargets"][0];
    v.eq("the target's health", target["health"].as_str(), Some("up"));
    v.eq("the target's last scrape error", target["lastError"].as_str(), Some(""));
    v.finish();
    Ok(())
}

/// The think delay of the native histograms' test: 21 ms sits in the native bucket
/// (2^(-44/8), 2^(-43/8)] = (20.26 ms, 22.10 ms], with a millisecond above it for the
/// scheduling a sleep adds (20 ms itself would be 0.26 ms under that bucket's floor).
const NATIVE_DELAY_MS: u64 = 21;

/// The native bucket (schema 3) holding `seconds`: its index.
fn native_bucket(seconds: f64) -> i32 {
    (seconds.log2() * 8.0).ceil() as i32
}

#[test]
fn prometheus_scrapes_native_histograms() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let Scraped { _server, addr, tracer, prometheus, sent, stored } =
        scraped(NATIVE_DELAY_MS, &["--native-histograms"], &["native-histograms"])?;
    // The native form: the histogram itself, no `_bucket` series (Prometheus stores only
    // the native buckets of a histogram that has them).
    let think = format!("tracer_request_phase_seconds{{listener=\"{addr}\",phase=\"think\"}}");
    let quantile = prometheus
        .query(&format!("histogram_quantile(0.5, sum(rate({think}[1m])))"))?
        .context("no native think histogram stored (did Prometheus get the protobuf format?)")?;
    let count = prometheus.query(&format!("histogram_count({think})"))?.context("no native think count")?;
    let classic = prometheus.query(&format!("count(tracer_request_phase_seconds_bucket{{listener=\"{addr}\"}})"))?;
    let targets: Value = serde_json::from_str(&prometheus.get("/api/v1/targets")?)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    let p50_ms = phase_ms(l, "think", "p50_ns");
    eprintln!(
        "{}Prometheus: requests {stored}, think count {count}, think p50 {:.3} ms (histogram_quantile over native \
         buckets, bucket {}), the tracer's p50 {p50_ms:.3} ms (bucket {}); classic bucket series {classic:?}; targets {}",
        describe(report),
        quantile * 1e3,
        native_bucket(quantile),
        native_bucket(p50_ms / 1e3),
        targets["data"]["activeTargets"]
    );

    let mut v = Verdicts::default();
    v.eq("requests in the final report", l["requests"].as_f64(), Some(sent));
    v.eq("requests Prometheus stored against the final report", Some(stored), l["requests"].as_f64());
    v.eq(
        "think samples in the native histogram against the final report",
        Some(count),
        Some(phase_count(l, "think") as f64),
    );
    let expected = native_bucket(NATIVE_DELAY_MS as f64 / 1e3);
    let (low, high) = (2f64.powf((expected - 1) as f64 / 8.0), 2f64.powf(expected as f64 / 8.0));
    v.check(quantile > low && quantile <= high, || {
        format!(
            "histogram_quantile(0.5) of think {:.3} ms, not in the native bucket ({:.3}, {:.3}] ms holding \
             {NATIVE_DELAY_MS} ms (the tracer's p50: {p50_ms:.3} ms)",
            quantile * 1e3,
            low * 1e3,
            high * 1e3
        )
    });
    v.eq(
        "the native bucket of Prometheus's p50 against the tracer's",
        Some(native_bucket(quantile)),
        Some(native_bucket(p50_ms / 1e3)),
    );
    let target = &targets["data"]["activeTargets"][0];
    v.eq("the target's health", target["health"].as_str(), Some("up"));
    v.eq("the target's last scrape error", target["lastError"].as_str(), Some(""));
    v.finish();
    Ok(())
}

#[test]
fn a_metrics_address_in_use_is_a_set_up_error() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let out = Command::new(tracer_bin())
        .args(["--pid", &std::process::id().to_string(), "--duration", "1s", "--metrics-addr"])
        .arg(taken.local_addr()?.to_string())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--metrics-addr"), "{stderr}");
    Ok(())
}
