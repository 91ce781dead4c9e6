//! A load generator that holds a request rate (wrk cannot), and the whole machine's busy
//! CPU time over its run: what the bench divides into machine CPU per request at a fixed
//! rate, which holds everything an observer causes wherever it runs.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// One run at a fixed rate.
#[derive(Debug, Clone, Default)]
pub struct PacedRun {
    /// The rate asked for, requests per second.
    pub rate: f64,
    /// Requests answered with a 2xx or 3xx status and their whole body.
    pub answered: u64,
    /// Requests that failed: connection errors, timeouts, other statuses.
    pub errors: u64,
    pub seconds: f64,
    /// Busy CPU time of all CPUs over the run, ns (/proc/stat: everything but idle and
    /// iowait).
    pub busy_ns: f64,
    /// CPUs online: what `busy_ns` is a share of.
    pub cpus: f64,
}

impl PacedRun {
    /// Requests answered per second.
    pub fn served_rps(&self) -> f64 {
        self.answered as f64 / self.seconds
    }

    /// Whether the server kept up: at least 95% of the rate answered. A run that fell
    /// behind measured a saturated machine, not the rate.
    pub fn held(&self) -> bool {
        self.served_rps() >= 0.95 * self.rate
    }

    /// How busy the machine's CPUs were over the run, 0 to 1: near 1, the rate was not
    /// below saturation whatever was served.
    pub fn busy_share(&self) -> f64 {
        self.busy_ns / (self.seconds * 1e9 * self.cpus)
    }

    /// The machine's busy CPU per answered request, µs.
    pub fn cpu_per_request_us(&self) -> Option<f64> {
        (self.answered > 0).then(|| self.busy_ns / self.answered as f64 / 1e3)
    }
}

/// The busy time (ns) in /proc/stat's aggregate `cpu` line: user, nice, system, irq,
/// softirq and steal (guest time is already inside user); idle and iowait are not.
pub fn busy_ns(proc_stat: &str, tick_ns: f64) -> Option<f64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().map(|&i| ticks.get(i).copied().unwrap_or(0.0)).sum();
    Some(busy * tick_ns)
}

fn machine_busy_ns() -> Result<f64> {
    // SAFETY: sysconf has no side effects.
    let tick_ns = 1e9 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    busy_ns(&stat, tick_ns).context("no aggregate cpu line in /proc/stat")
}

/// Sends `rate` requests per second to 127.0.0.1:`port` for `seconds`, spread over
/// `lanes` threads of one request in flight each, on a schedule: each lane's requests
/// are due at fixed times (a late one goes at once, the schedule does not move), so
/// the rate holds whatever the latency while the server keeps up. With `close`, a new
/// connection per request (`Connection: close`, read until the server closes it);
/// otherwise one keep-alive connection per lane, opened again after an error.
pub fn run(port: u16, rate: f64, seconds: u64, lanes: usize, close: bool) -> Result<PacedRun> {
    if !rate.is_finite() || rate <= 0.0 || lanes == 0 {
        bail!("a paced run needs a positive rate and at least one lane (rate {rate}, {lanes} lanes)");
    }
    let interval = Duration::from_secs_f64(lanes as f64 / rate);
    let busy_before = machine_busy_ns()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let counts: Vec<(u64, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|lane| {
                // Lanes staggered over one interval, so that requests arrive evenly.
                let first = start + interval.mul_f64(lane as f64 / lanes as f64);
                s.spawn(move || run_lane(port, first, interval, end, close))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("paced lane")).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let busy_ns = machine_busy_ns()? - busy_before;
    let (answered, errors) = counts.iter().fold((0, 0), |(a, e), (la, le)| (a + la, e + le));
    // SAFETY: sysconf has no side effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as f64;
    Ok(PacedRun { rate, answered, errors, seconds, busy_ns, cpus })
}

/// One lane's requests: (answered, errors).
fn run_lane(port: u16, first: Instant, interval: Duration, end: Instant, close: bool) -> (u64, u64) {
    let (mut answered, mut errors) = (0, 0);
    let mut connection: Option<BufReader<TcpStream>> = None;
    let mut body = Vec::new();
    let mut due = first;
    while due < end {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if due > now {
            thread::sleep(due - now);
        }
        let result = if close {
            exchange_closing(port, &mut body)
        } else {
            exchange_kept_alive(port, &mut connection, &mut body)
        };
        match result {
            Ok(true) => answered += 1,
            Ok(false) => errors += 1,
            Err(_) => {
                errors += 1;
                connection = None;
            }
        }
        due += interval;
    }
    (answered, errors)
}

const REQUEST: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
const TIMEOUT: Duration = Duration::from_secs(5);

fn connect(port: u16) -> Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Whether a status line says 2xx or 3xx.
fn success(status_line: &str) -> bool {
    matches!(status_line.split_whitespace().nth(1).and_then(|s| s.as_bytes().first()), Some(b'2' | b'3'))
}

/// One request on the lane's kept-alive connection: whether it was answered well; an
/// error drops the connection.
fn exchange_kept_alive(port: u16, connection: &mut Option<BufReader<TcpStream>>, body: &mut Vec<u8>) -> Result<bool> {
    if connection.is_none() {
        *connection = Some(BufReader::new(connect(port)?));
    }
    let reader = connection.as_mut().expect("connected");
    reader.get_mut().write_all(REQUEST)?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let ok = success(&line);
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed in a response's head");
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<usize>()?);
            }
        }
    }
    body.resize(length.context("a response without Content-Length")?, 0);
    reader.read_exact(body)?;
    Ok(ok)
}

/// One request on a connection of its own, read until the server closes it.
fn exchange_closing(port: u16, body: &mut Vec<u8>) -> Result<bool> {
    let mut stream = connect(port)?;
    stream.write_all(REQUEST_CLOSE)?;
    body.clear();
    stream.read_to_end(body)?;
    let head = body.split(|&b| b == b'\n').next().unwrap_or_default();
    Ok(success(&String::from_utf8_lossy(head)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 5 6 7 50 0\ncpu0 50 1 15 2500 20 2 3 3 25 0\nintr 1\n";
        // user 100 + nice 2 + system 30 + irq 5 + softirq 6 + steal 7, at 10 ms a tick.
        assert_eq!(busy_ns(stat, 1e7), Some(150.0 * 1e7));
        assert_eq!(busy_ns("cpu0 1 2 3\n", 1e7), None);
    }

    #[test]
    fn a_run_that_falls_behind_does_not_hold_its_rate() {
        let run = |answered| PacedRun { rate: 1000.0, answered, errors: 0, seconds: 4.0, busy_ns: 4e9, cpus: 2.0 };
        assert!(run(3900).held());
        assert!(!run(3700).held());
        assert_eq!(run(4000).cpu_per_request_us(), Some(1000.0));
        assert_eq!(run(4000).busy_share(), 0.5);
        assert_eq!(run(0).cpu_per_request_us(), None);
    }

    #[test]
    fn statuses() {
        assert!(success("HTTP/1.1 200 OK\r\n"));
        assert!(success("HTTP/1.1 304 Not Modified\r\n"));
        assert!(!success("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!success(""));
    }

    /// Against a listener of this test's own: every request answered, none lost.
    #[test]
    fn holds_a_rate_against_a_keep_alive_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if line == "\r\n" {
                            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc");
                        }
                        line.clear();
                    }
                });
            }
        });
        let run = run(port, 200.0, 1, 4, false).unwrap();
        assert_eq!(run.errors, 0);
        assert!((195..=201).contains(&run.answered), "{run:?}");
        assert!(run.held(), "{run:?}");
    }
}
