//! `cargo xtask soak`: the tracer run as a service for a long time — Prometheus metrics
//! scraped every second, request labels on, a steady rate of short connections (one
//! request each, many distinct paths) — recording its memory, to show that nothing in
//! it grows with the connections, the labels or the scrapes. Writes its section of
//! BENCHMARKS.md (between the `soak` markers), leaving the rest as it is.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, exec, is_root, setup, workspace_root, Killed};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// How long the tracer runs.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// New connections per second, one request each.
    #[arg(long, default_value_t = 300)]
    pub rate: u64,
    /// Where to write the results (default: the soak section of BENCHMARKS.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub const BEGIN: &str = "<!-- soak: written by `cargo xtask soak` -->";
pub const END: &str = "<!-- /soak -->";

/// Memory is flat when, after the first minute, it never exceeds the first minute's by
/// more than this.
const FLAT: f64 = 0.10;

fn release_bin(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The request of connection `i`: a mix of one static path, identifier paths (folded
/// into one `{id}` label) and one distinct path in ten (beyond `--max-labels`: `other`).
fn path(i: u64) -> String {
    match i % 10 {
        0 => format!("/search/term{i}x"),
        1..=4 => format!("/items/{}", i % 5_000),
        _ => "/static/app.js".to_owned(),
    }
}

/// One short connection: connect, one request, read the response to its end.
fn exchange(server: SocketAddr, path: &str) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    if !response.starts_with(b"HTTP/1.1 200") {
        bail!("unexpected response {:?}", String::from_utf8_lossy(&response[..response.len().min(40)]));
    }
    Ok(())
}

/// The metrics page, as a scraper gets it.
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: tracer\r\nConnection: close\r\n\r\n")?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    if !page.starts_with("HTTP/1.1 200") {
        bail!("scrape answered {:?}", page.lines().next());
    }
    Ok(page)
}

struct Point {
    at_s: u64,
    rss_kb: u64,
    page_bytes: usize,
    served: u64,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    if !is_root() {
        bail!("the soak loads eBPF programs: run `cargo xtask soak` as root");
    }
    exec(cargo().args(["build", "--release", "--package", "tracer", "--package", "tracer-tests", "--bins"]))?;
    let mut lab = Killed(
        Command::new(release_bin("lab"))
            .args(["server", "--scenario", "plain"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the lab server")?,
    );
    let mut line = String::new();
    BufReader::new(lab.0.stdout.take().expect("piped")).read_line(&mut line)?;
    let server: SocketAddr =
        line.trim().strip_prefix("listening on ").context("the lab server did not start")?.parse()?;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let report_path = std::env::temp_dir().join(format!("tracer-soak-{}.json", std::process::id()));
    let mut tracer = Killed(
        Command::new(release_bin("tracer"))
            .args(["--pid", &lab.0.id().to_string(), "--labels", "--output", "json"])
            .args(["--metrics-addr", &metrics.to_string()])
            .stdout(fs::File::create(&report_path)?)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the tracer")?,
    );
    let mut stderr = BufReader::new(tracer.0.stderr.take().expect("piped"));
    loop {
        line.clear();
        if stderr.read_line(&mut line)? == 0 {
            bail!("the tracer exited before tracing");
        }
        if line.contains("tracer: tracing") {
            break;
        }
    }
    thread::spawn(move || for _ in stderr.lines() {});
    let tracer_pid = tracer.0.id();

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, served, failed, rate) = (stop.clone(), served.clone(), failed.clone(), opts.rate.max(1));
        thread::spawn(move || {
            let start = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                match exchange(server, &path(i)) {
                    Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
            }
        })
    };
    let (scrapes, scrape_errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let page_bytes = Arc::new(AtomicU64::new(0));
    let scraper = {
        let (stop, scrapes, scrape_errors, page_bytes) =
            (stop.clone(), scrapes.clone(), scrape_errors.clone(), page_bytes.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match scrape(metrics) {
                    Ok(page) => {
                        scrapes.fetch_add(1, Ordering::Relaxed);
                        page_bytes.store(page.len() as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        scrape_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let started = Instant::now();
    let total = Duration::from_secs(opts.minutes * 60);
    let mut points = Vec::new();
    while started.elapsed() < total {
        thread::sleep(Duration::from_secs(10).min(total.saturating_sub(started.elapsed())));
        if let Ok(Some(status)) = tracer.0.try_wait() {
            bail!("the tracer exited during the run: {status}");
        }
        let p = Point {
            at_s: started.elapsed().as_secs(),
            rss_kb: rss_kb(tracer_pid).unwrap_or(0),
            page_bytes: page_bytes.load(Ordering::Relaxed) as usize,
            served: served.load(Ordering::Relaxed),
        };
        eprintln!(
            "soak {:>5}s: tracer RSS {:.1} MB, {} requests served, metrics page {} B",
            p.at_s,
            p.rss_kb as f64 / 1024.0,
            p.served,
            p.page_bytes
        );
        points.push(p);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let _ = scraper.join();
    // The last responses' events reach the tracer before it stops.
    thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(tracer_pid as i32, libc::SIGINT) };
    let status = tracer.0.wait()?;
    drop(lab);
    let lines = fs::read_to_string(&report_path)?;
    let _ = fs::remove_file(&report_path);
    let report: serde_json::Value = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "report" && v["kind"] == "final")
        .last()
        .with_context(|| format!("no final report from the tracer (exit {status})"))?;
    let listener = report["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["port"] == server.port())
        .context("the lab server's listener is not in the final report")?;
    let counted = listener["requests"].as_u64().unwrap_or(0);
    let labels = listener["endpoints"].as_array().map_or(0, |e| e.len());
    let summary = Summary {
        opts,
        points,
        served: served.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        counted,
        lost: report["lost_events"].as_u64().unwrap_or(u64::MAX),
        labels,
        scrapes: scrapes.load(Ordering::Relaxed),
        scrape_errors: scrape_errors.load(Ordering::Relaxed),
    };
    let section = summary.render();
    print!("{section}");
    match &opts.out {
        Some(path) => fs::write(path, &section)?,
        None => {
            let path = workspace_root().join("BENCHMARKS.md");
            let old = fs::read_to_string(&path).unwrap_or_default();
            fs::write(&path, with_section(&old, &section))?;
            eprintln!("soak: wrote its section of {}", path.display());
        }
    }
    if !summary.flat() || summary.served != summary.counted || summary.lost != 0 {
        bail!("the soak did not hold: see its section");
    }
    Ok(())
}

struct Summary<'a> {
    opts: &'a Options,
    points: Vec<Point>,
    served: u64,
    failed: u64,
    counted: u64,
    lost: u64,
    labels: usize,
    scrapes: u64,
    scrape_errors: u64,
}

impl Summary<'_> {
    /// RSS at the end of the first minute, and the most after it.
    fn rss(&self) -> (u64, u64) {
        let first = self.points.iter().find(|p| p.at_s >= 60).or(self.points.last()).map_or(0, |p| p.rss_kb);
        let most = self.points.iter().filter(|p| p.at_s >= 60).map(|p| p.rss_kb).max().unwrap_or(first);
        (first, most)
    }

    fn flat(&self) -> bool {
        let (first, most) = self.rss();
        first > 0 && most as f64 <= first as f64 * (1.0 + FLAT)
    }

    fn render(&self) -> String {
        let (first, most) = self.rss();
        let mb = |kb: u64| kb as f64 / 1024.0;
        let mut out = String::new();
        let _ = writeln!(out, "{BEGIN}");
        let _ = writeln!(out, "## A long run as a service (`cargo xtask soak`)\n");
        let _ = writeln!(
            out,
            "The tracer ran {} minutes on the lab server with `--labels --metrics-addr`, its metrics \
             scraped every second, while a client opened {} new connections a second, one request \
             each: a static path, identifier paths (one `{{id}}` label) and one distinct path in ten \
             (beyond `--max-labels`: counted under `other`). Its resident memory, every 10 s:\n",
            self.opts.minutes, self.opts.rate
        );
        let _ = writeln!(out, "| minute | tracer RSS | requests served | metrics page |");
        let _ = writeln!(out, "| ---: | ---: | ---: | ---: |");
        let step = (self.points.len() / 12).max(1);
        for (i, p) in self.points.iter().enumerate() {
            if i % step == 0 || i + 1 == self.points.len() {
                let _ = writeln!(
                    out,
                    "| {:.1} | {:.1} MB | {} | {} B |",
                    p.at_s as f64 / 60.0,
                    mb(p.rss_kb),
                    p.served,
                    p.page_bytes
                );
            }
        }
        let growth = if first > 0 { (most as f64 / first as f64 - 1.0) * 100.0 } else { f64::NAN };
        let _ = writeln!(
            out,
            "\n- RSS after the first minute {:.1} MB, at most {:.1} MB after it ({growth:+.1}%): {} \
             (flat: within {:.0}%).",
            mb(first),
            mb(most),
            if self.flat() { "**flat**" } else { "**not flat**" },
            FLAT * 100.0
        );
        let _ = writeln!(
            out,
            "- Requests served {} ({} failed), counted by the tracer {}: {}; lost events {}; \
             labels kept {}.",
            self.served,
            self.failed,
            self.counted,
            if self.served == self.counted { "equal" } else { "**not equal**" },
            self.lost,
            self.labels
        );
        let _ = writeln!(out, "- Scrapes {} answered, {} failed.", self.scrapes, self.scrape_errors);
        let _ = writeln!(out, "{END}");
        out
    }
}

/// `text` with its soak section replaced by `section` (or `section` appended).
pub fn with_section(text: &str, section: &str) -> String {
    match (text.find(BEGIN), text.find(END)) {
        (Some(begin), Some(end)) if end > begin => {
            let after = &text[end + END.len()..];
            format!("{}{}{}", &text[..begin], section.trim_end(), after)
        }
        _ => format!("{}\n{section}", text.trim_end()),
    }
}

/// The soak section of `text`, to carry over when the rest is written anew.
pub fn section_of(text: &str) -> Option<&str> {
    let begin = text.find(BEGIN)?;
    let end = text[begin..].find(END)? + begin + END.len();
    Some(&text[begin..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_in_place_or_appended() {
        let section = format!("{BEGIN}\nnew\n{END}\n");
        assert_eq!(with_section("# B\n\ntext\n", &section), format!("# B\n\ntext\n{section}"));
        let old = format!("# B\n{BEGIN}\nold\n{END}\n## After\n");
        assert_eq!(with_section(&old, &section), format!("# B\n{BEGIN}\nnew\n{END}\n## After\n"));
        assert_eq!(section_of(&old), Some(format!("{BEGIN}\nold\n{END}").as_str()));
        assert_eq!(section_of("# B\n"), None);
    }

    #[test]
    fn memory_is_flat_within_ten_percent_of_the_first_minute() {
        let opts = Options { minutes: 3, rate: 1, out: None };
        let points = |rss: &[u64]| {
            rss.iter()
                .enumerate()
                .map(|(i, &rss_kb)| Point { at_s: 30 * (i as u64 + 1), rss_kb, page_bytes: 0, served: 0 })
                .collect()
        };
        let summary = |rss: &[u64]| Summary {
            opts: &opts,
            points: points(rss),
            served: 1,
            failed: 0,
            counted: 1,
            lost: 0,
            labels: 0,
            scrapes: 0,
            scrape_errors: 0,
        };
        // Growth in the first minute is not held against it.
        assert!(summary(&[10_000, 30_000, 30_500, 32_900, 31_000]).flat());
        assert!(!summary(&[10_000, 30_000, 30_500, 33_100, 31_000]).flat());
        assert!(summary(&[10_000, 30_000]).render().contains("**flat**"));
    }
}
