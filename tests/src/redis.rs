//! Redis from Debian's packages (`redis-server`, and `redis-benchmark` to load it), run
//! by the tests on a free loopback port in a directory of its own, without persistence;
//! stopped and removed on drop. Tests never use the system's own instance (port 6379),
//! if the package started one.
//!
//! Redis counts the commands it ran (`INFO commandstats`): the truth a test compares the
//! tracer's per-command figures with. `redis-benchmark` sends commands of its own besides
//! the ones it is asked to run (`CONFIG GET save` and `CONFIG GET appendonly` when it
//! starts), so a test compares `GET` and `SET` only.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::harness::Proc;

const SERVER: &str = "/usr/bin/redis-server";
const BENCHMARK: &str = "/usr/bin/redis-benchmark";

pub struct Redis {
    pub port: u16,
    pub pid: u32,
    /// Always `Some` until dropped.
    proc: Option<Proc>,
    dir: PathBuf,
}

impl Redis {
    /// Starts a server and returns once it answers `PING`.
    pub fn start() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        anyhow::ensure!(std::path::Path::new(SERVER).exists(), "{SERVER} not installed (run `cargo xtask setup`)");
        let dir = std::env::temp_dir().join(format!(
            "tracer-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            // Nothing is written to disk: no snapshots, no append-only file.
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {SERVER}"))?;
        let pid = child.id();
        let mut redis = Self { port, pid, proc: Some(Proc { child }), dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = Resp::connect(redis.addr()).and_then(|mut c| c.command(&["PING"]));
            match pong {
                Ok(Reply::Simple(s)) if s == "PONG" => return Ok(redis),
                Ok(other) => bail!("redis answered PING with {other:?}"),
                Err(e) => {
                    let exited = redis.proc.as_mut().expect("running").child.try_wait()?;
                    if exited.is_some() || Instant::now() > deadline {
                        bail!("redis on port {port} does not answer PING ({e:#}): {}", redis.log());
                    }
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// One command on a connection of its own.
    pub fn command(&self, args: &[&str]) -> Result<Reply> {
        match Resp::connect(self.addr())?.command(args)? {
            Reply::Error(e) => bail!("redis answered {args:?} with an error: {e}"),
            reply => Ok(reply),
        }
    }

    /// Calls per command since the server started (or since [`Redis::reset_stats`]), from
    /// `INFO commandstats`: upper-case names (`GET`, and `CONFIG|GET` for a subcommand).
    /// The `INFO` that asks is not counted yet; earlier ones are.
    pub fn commandstats(&self) -> Result<HashMap<String, u64>> {
        let Reply::Bulk(Some(text)) = self.command(&["INFO", "commandstats"])? else {
            bail!("INFO commandstats did not answer a bulk string");
        };
        parse_commandstats(&String::from_utf8_lossy(&text))
    }

    /// Zeroes the server's statistics, `commandstats` among them (`CONFIG RESETSTAT`).
    pub fn reset_stats(&self) -> Result<()> {
        match self.command(&["CONFIG", "RESETSTAT"])? {
            Reply::Simple(s) if s == "OK" => Ok(()),
            other => bail!("CONFIG RESETSTAT answered {other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // SIGTERM, then SIGKILL after two seconds (Proc's drop); without persistence
        // Redis saves nothing on the way out.
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `cmdstat_get:calls=N,usec=…` lines into command name → calls.
pub fn parse_commandstats(text: &str) -> Result<HashMap<String, u64>> {
    let mut calls = HashMap::new();
    for line in text.lines() {
        let Some((name, fields)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let n = fields
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no call count in {line:?}"))?;
        calls.insert(name.to_ascii_uppercase(), n);
    }
    Ok(calls)
}

/// Runs `redis-benchmark` against the server on `port`: `tests` as its `-t` (e.g.
/// `get,set`), `requests` requests of each, over `clients` connections, `pipeline`
/// requests per write. Fails unless it exits successfully.
///
/// `requests` must be a multiple of `pipeline`: redis-benchmark sends whole pipelines
/// while fewer than `requests` were sent, so it would send more (1008 of 1000 with 16
/// per write).
pub fn benchmark(port: u16, tests: &str, requests: u32, clients: u32, pipeline: u32) -> Result<()> {
    anyhow::ensure!(
        pipeline > 0 && requests % pipeline == 0,
        "{requests} requests are not a whole number of pipelines of {pipeline}"
    );
    let out = Command::new(BENCHMARK)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", tests])
        .args(["-n", &requests.to_string(), "-c", &clients.to_string(), "-P", &pipeline.to_string(), "-q"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {BENCHMARK} (run `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A reply in the Redis protocol (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    /// `None`: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array.
    Array(Option<Vec<Reply>>),
}

/// A plain Redis connection: commands as arrays of bulk strings, one reply each.
pub struct Resp {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Resp {
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let writer = TcpStream::connect(addr).with_context(|| format!("connecting to redis at {addr}"))?;
        writer.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Self { writer, reader })
    }

    /// Sends `args` (a command and its arguments) and reads the reply; an error reply is
    /// a `Reply::Error`, not an `Err`.
    pub fn command(&mut self, args: &[&str]) -> Result<Reply> {
        self.writer.write_all(&encode(args))?;
        read_reply(&mut self.reader)
    }
}

/// `args` as the protocol's array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply.
pub fn read_reply(reader: &mut impl BufRead) -> Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("redis closed the connection");
    }
    let line = line.strip_suffix("\r\n").with_context(|| format!("unterminated reply line {line:?}"))?;
    let (kind, rest) = line.split_at_checked(1).context("empty reply line")?;
    let number = || rest.parse::<i64>().with_context(|| format!("not a number in {line:?}"));
    Ok(match kind {
        "+" => Reply::Simple(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Integer(number()?),
        "$" => match number()? {
            n if n < 0 => Reply::Bulk(None),
            n => {
                let mut data = vec![0u8; n as usize + 2];
                reader.read_exact(&mut data)?;
                anyhow::ensure!(data.ends_with(b"\r\n"), "bulk string of {n} bytes not followed by CRLF");
                data.truncate(n as usize);
                Reply::Bulk(Some(data))
            }
        },
        "*" => match number()? {
            n if n < 0 => Reply::Array(None),
            n => Reply::Array(Some((0..n).map(|_| read_reply(reader)).collect::<Result<_>>()?)),
        },
        _ => bail!("unknown reply type in {line:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed() {
        let text = b"+OK\r\n-ERR no\r\n:42\r\n$5\r\nhe\r\no\r\n$-1\r\n*2\r\n$1\r\na\r\n:1\r\n*-1\r\n";
        let mut reader = &text[..];
        let replies: Vec<Reply> = (0..7).map(|_| read_reply(&mut reader).unwrap()).collect();
        assert_eq!(
            replies,
            [
                Reply::Simple("OK".into()),
                Reply::Error("ERR no".into()),
                Reply::Integer(42),
                Reply::Bulk(Some(b"he\r\no".to_vec())),
                Reply::Bulk(None),
                Reply::Array(Some(vec![Reply::Bulk(Some(b"a".to_vec())), Reply::Integer(1)])),
                Reply::Array(None),
            ]
        );
        assert_eq!(encode(&["PING"]), b"*1\r\n$4\r\nPING\r\n");
        let stats = parse_commandstats(
            "# Commandstats\r\ncmdstat_get:calls=1000,usec=512,usec_per_call=0.51,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_config|get:calls=2,usec=30,usec_per_call=15.00,rejected_calls=0,failed_calls=0\r\n",
        )
        .unwrap();
        assert_eq!(stats, HashMap::from([("GET".to_owned(), 1000), ("CONFIG|GET".to_owned(), 2)]));
    }

    /// A real server (no root needed): the benchmark's GETs and SETs are what Redis counts.
    #[test]
    fn benchmark_counts_in_commandstats() {
        let redis = Redis::start().unwrap();
        assert_eq!(redis.command(&["SET", "k", "v"]).unwrap(), Reply::Simple("OK".into()));
        assert_eq!(redis.command(&["GET", "k"]).unwrap(), Reply::Bulk(Some(b"v".to_vec())));
        redis.reset_stats().unwrap();
        benchmark(redis.port, "get,set", 1000, 4, 1).unwrap();
        let stats = redis.commandstats().unwrap();
        assert_eq!((stats.get("GET"), stats.get("SET")), (Some(&1000), Some(&1000)), "{stats:?}");
        redis.reset_stats().unwrap();
        benchmark(redis.port, "get,set", 1024, 4, 16).unwrap();
        let stats = redis.commandstats().unwrap();
        assert_eq!((stats.get("GET"), stats.get("SET")), (Some(&1024), Some(&1024)), "pipelined: {stats:?}");
        assert!(benchmark(redis.port, "get", 1000, 4, 16).is_err(), "1000 is no whole number of pipelines of 16");
        let pid = redis.pid;
        drop(redis);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "redis {pid} still runs after drop");
    }
}
