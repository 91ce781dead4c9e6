//! The lab client: connections that send requests and read whole responses, counting
//! every byte on the wire, so tests can compare with what the tracer saw.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

#[derive(Debug, Clone, clap::Args)]
pub struct ClientOptions {
    /// Server address.
    #[arg(long)]
    pub server: SocketAddr,
    /// Connections, opened one after another (or in parallel with --parallel).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Requests per connection (keep-alive).
    #[arg(long, default_value_t = 1)]
    pub requests: usize,
    /// Response body size asked for.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Run the connections in parallel, one thread each.
    #[arg(long)]
    pub parallel: bool,
    /// Wait this long after the response headers before reading the body (slow reader).
    #[arg(long, default_value_t = 0)]
    pub read_delay_ms: u64,
    /// Receive buffer size to set before connecting (0: system default).
    #[arg(long, default_value_t = 0)]
    pub rcvbuf: i32,
    /// Wait this long after connect() returns before sending the first request.
    #[arg(long, default_value_t = 0)]
    pub pause_after_connect_ms: u64,
    /// Request these paths in order on each connection (repeat the option), instead of
    /// --requests requests for --size bytes; the last one asks the server to close.
    #[arg(long = "path")]
    pub paths: Vec<String>,
}

impl ClientOptions {
    /// The options' defaults against `server` (one connection, one request of 100 bytes),
    /// to be changed field by field: `ClientOptions { requests: 10, ..ClientOptions::to(addr) }`.
    pub fn to(server: SocketAddr) -> Self {
        Self {
            server,
            connections: 1,
            requests: 1,
            size: 100,
            parallel: false,
            read_delay_ms: 0,
            rcvbuf: 0,
            pause_after_connect_ms: 0,
            paths: Vec::new(),
        }
    }
}

/// What one connection sent and received, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnResult {
    pub local_port: u16,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub requests: usize,
    /// How long connect() took.
    pub connect: Duration,
    pub elapsed: Duration,
    /// Each request and its response, in order: what a per-endpoint figure of the
    /// tracer's is compared with.
    pub exchanges: Vec<Exchange>,
}

/// One request on a connection and its response, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The request target (with its query string, if any).
    pub target: String,
    pub status: u16,
    /// The request's bytes.
    pub bytes_sent: u64,
    /// The response's bytes: status line, headers and body.
    pub bytes_received: u64,
}

pub fn request_text(size: usize, close: bool) -> String {
    target_request_text(&format!("/?size={size}"), close)
}

/// A `GET` of `target` (a path, with or without a query string).
pub fn target_request_text(target: &str, close: bool) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: lab\r\n{}\r\n", if close { "Connection: close\r\n" } else { "" })
}

fn connect(opts: &ClientOptions) -> Result<TcpStream> {
    if opts.rcvbuf == 0 {
        return TcpStream::connect(opts.server).with_context(|| format!("connecting to {}", opts.server));
    }
    // The receive buffer must be set before connect() to limit the advertised window.
    let domain = if opts.server.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    crate::server::set_rcvbuf(&stream, opts.rcvbuf)?;
    let (addr, len) = sockaddr(opts.server);
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_storage).cast(), len) };
    anyhow::ensure!(rc == 0, "connecting to {}: {}", opts.server, std::io::Error::last_os_error());
    Ok(stream)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            (storage, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            (storage, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// Reads one response (headers, then `Content-Length` body bytes, after waiting
/// `read_delay_ms` between the two); the bytes read.
pub fn read_response(reader: &mut impl BufRead, read_delay_ms: u64) -> Result<u64> {
    Ok(read_response_status(reader, read_delay_ms)?.1)
}

/// [`read_response`], with the response's status code.
pub fn read_response_status(reader: &mut impl BufRead, read_delay_ms: u64) -> Result<(u16, u64)> {
    let mut received = 0u64;
    let mut content_length = None;
    let mut status = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("server closed the connection mid-response");
        }
        received += line.len() as u64;
        if line == "\r\n" {
            break;
        }
        if status.is_none() {
            let code = line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
            status = Some(code.with_context(|| format!("no status code in {line:?}"))?);
        } else if let Some(v) = line.strip_prefix("Content-Length: ") {
            content_length = Some(v.trim().parse::<usize>()?);
        }
    }
    let length = content_length.context("response without Content-Length")?;
    if read_delay_ms > 0 {
        thread::sleep(Duration::from_millis(read_delay_ms));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((status.context("response without a status line")?, received + length as u64))
}

/// One connection: `requests` exchanges (or one per path of `paths`), the last with
/// `Connection: close`.
pub fn one_connection(opts: &ClientOptions) -> Result<ConnResult> {
    let start = Instant::now();
    let stream = connect(opts)?;
    let connected = start.elapsed();
    if opts.pause_after_connect_ms > 0 {
        thread::sleep(Duration::from_millis(opts.pause_after_connect_ms));
    }
    let local_port = stream.local_addr()?.port();
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let targets: Vec<String> =
        if opts.paths.is_empty() { vec![format!("/?size={}", opts.size); opts.requests] } else { opts.paths.clone() };
    let mut exchanges = Vec::with_capacity(targets.len());
    for (i, target) in targets.iter().enumerate() {
        let text = target_request_text(target, i + 1 == targets.len());
        writer.write_all(text.as_bytes())?;
        let (status, received) = read_response_status(&mut reader, opts.read_delay_ms)
            .with_context(|| format!("response to GET {target}"))?;
        exchanges.push(Exchange {
            target: target.clone(),
            status,
            bytes_sent: text.len() as u64,
            bytes_received: received,
        });
    }
    Ok(ConnResult {
        local_port,
        bytes_sent: exchanges.iter().map(|e| e.bytes_sent).sum(),
        bytes_received: exchanges.iter().map(|e| e.bytes_received).sum(),
        requests: exchanges.len(),
        connect: connected,
        elapsed: start.elapsed(),
        exchanges,
    })
}

pub fn run(opts: &ClientOptions) -> Result<Vec<ConnResult>> {
    if opts.parallel {
        let handles: Vec<_> = (0..opts.connections)
            .map(|_| {
                let opts = opts.clone();
                thread::spawn(move || one_connection(&opts))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    } else {
        (0..opts.connections).map(|_| one_connection(opts)).collect()
    }
}
