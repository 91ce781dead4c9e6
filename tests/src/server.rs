//! The lab server's scenarios.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{mpsc, Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::backends::{spin, Shared, Upstreams};
use std::sync::atomic::AtomicUsize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Answer at once.
    Plain,
    /// Sleep DELAY before writing each response.
    SlowThink,
    /// Write all but the last body byte, sleep DELAY, write the last byte.
    BodyStall,
    /// Sleep DELAY before each accept() (combine with a small --backlog).
    SlowAccept,
    /// Only WORKERS threads serve connections (each thinking DELAY per request); the
    /// other connections wait, accepted but unread.
    StarvedWorkers,
    /// Answer at once with RESPONSE_SIZE bytes from a large send buffer, so the response
    /// waits in the kernel for a client that reads late (`lab client --read-delay-ms`).
    SlowReader,
    /// Answer at once with RESPONSE_SIZE bytes in one write through a 16 KiB send
    /// buffer: the write itself blocks while a client that reads late
    /// (`--read-delay-ms`, `--rcvbuf`) lets the response sit (`send`, not `think`).
    BlockedWrite,
    /// A round-robin load balancer: each request goes to the next --backend (keep-alive
    /// connections per serving thread) and its answer comes back once the backend's
    /// whole response is read.
    Balancer,
    /// Each request looks up a row in PostgreSQL: on --replica for one request in
    /// --replica-every, on --primary otherwise.
    Database,
    /// Each request burns DELAY of CPU in the server itself: no upstream call.
    LocalWork,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServerOptions {
    #[arg(long, value_enum, default_value_t = Scenario::Plain)]
    pub scenario: Scenario,
    /// The injected delay in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Threads serving connections in starved-workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// listen() backlog.
    #[arg(long, default_value_t = 128)]
    pub backlog: i32,
    /// Body size when the request does not ask for one.
    #[arg(long, default_value_t = 100)]
    pub response_size: usize,
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Exit after this many connections have been served (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,
    /// Close connections abortively (SO_LINGER 0): the kernel resets them.
    #[arg(long)]
    pub abort_on_close: bool,
    /// Backends of the balancer (repeat the option).
    #[arg(long = "backend")]
    pub backends: Vec<SocketAddr>,
    /// PostgreSQL connection string of the primary (database scenario).
    #[arg(long)]
    pub primary: Option<String>,
    /// PostgreSQL connection string of the replica (database scenario).
    #[arg(long)]
    pub replica: Option<String>,
    /// One request in this many reads from the replica.
    #[arg(long, default_value_t = 4)]
    pub replica_every: usize,
    /// Also exchange UDP datagrams and Unix socket messages all along (traffic the
    /// tracer must ignore).
    #[arg(long)]
    pub side_traffic: bool,
}

/// UDP and Unix-socket ping-pong in the background, forever.
fn side_traffic() -> Result<()> {
    use std::{io::Read as _, net::UdpSocket, os::unix::net::UnixStream};
    let a = UdpSocket::bind("127.0.0.1:0")?;
    let b = UdpSocket::bind("127.0.0.1:0")?;
    let (mut x, mut y) = UnixStream::pair()?;
    thread::spawn(move || -> Result<()> {
        let mut buf = [0u8; 64];
        loop {
            a.send_to(b"ping", b.local_addr()?)?;
            b.recv_from(&mut buf)?;
            x.write_all(b"ping")?;
            y.read_exact(&mut buf[..4])?;
            thread::sleep(Duration::from_millis(2));
        }
    });
    Ok(())
}

/// A listener with an explicit backlog (std's is fixed at 128).
pub fn listen(addr: SocketAddr, backlog: i32) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let rc = unsafe { libc::listen(listener.as_raw_fd(), backlog) };
    anyhow::ensure!(rc == 0, "listen({backlog}): {}", std::io::Error::last_os_error());
    Ok(listener)
}

struct Request {
    size: usize,
    close: bool,
    /// `delay=MS` in the query: sleep this long before answering, on top of the
    /// scenario's own work.
    delay: Duration,
}

/// Reads one request's headers; `None` at end of stream.
fn read_request(reader: &mut BufReader<TcpStream>, default_size: usize) -> Result<Option<Request>> {
    let mut request = Request { size: default_size, close: false, delay: Duration::ZERO };
    let mut first = true;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if first {
            first = false;
            if let Some(q) = line.split_whitespace().nth(1).and_then(|p| p.split_once('?')).map(|(_, q)| q.to_owned()) {
                for kv in q.split('&') {
                    match kv.split_once('=') {
                        Some(("size", v)) => request.size = v.parse().unwrap_or(default_size),
                        Some(("delay", v)) => request.delay = Duration::from_millis(v.parse().unwrap_or(0)),
                        _ => {}
                    }
                }
            }
        } else if line == "\r\n" || line == "\n" {
            return Ok(Some(request));
        } else if line.to_ascii_lowercase().starts_with("connection: close") {
            request.close = true;
        }
    }
}

fn serve_connection(stream: TcpStream, opts: &ServerOptions, shared: &Arc<Shared>) -> Result<()> {
    let mut upstreams = Upstreams::new(Arc::clone(shared));
    match opts.scenario {
        Scenario::SlowReader => set_sockopt(&stream, libc::SO_SNDBUF, 4 << 20)?,
        Scenario::BlockedWrite => set_sndbuf(&stream, 16 << 10)?,
        _ => {}
    }
    if opts.abort_on_close {
        set_linger_zero(&stream)?;
    }
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let delay = Duration::from_millis(opts.delay_ms);
    while let Some(request) = read_request(&mut reader, opts.response_size)? {
        match opts.scenario {
            Scenario::SlowThink | Scenario::StarvedWorkers => thread::sleep(delay),
            Scenario::Balancer => upstreams.balance(request.size)?,
            Scenario::Database => upstreams.query()?,
            Scenario::LocalWork => spin(delay),
            _ => {}
        }
        if !request.delay.is_zero() {
            thread::sleep(request.delay);
        }
        let header = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n",
            request.size,
            if request.close { "Connection: close\r\n" } else { "" }
        );
        let body = vec![b'x'; request.size];
        if opts.scenario == Scenario::BodyStall && request.size > 1 {
            let mut head = header.into_bytes();
            head.extend_from_slice(&body[..request.size - 1]);
            writer.write_all(&head)?;
            thread::sleep(delay);
            writer.write_all(&body[request.size - 1..])?;
        } else {
            let mut all = header.into_bytes();
            all.extend_from_slice(&body);
            writer.write_all(&all)?;
        }
        if request.close {
            break;
        }
    }
    Ok(())
}

/// Runs the server until `max_connections` have been served (forever if 0). Prints
/// `listening on ADDR` on stdout once ready.
pub fn run(opts: ServerOptions) -> Result<()> {
    let listener = listen(opts.listen, opts.backlog)?;
    if opts.side_traffic {
        side_traffic()?;
    }
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    if opts.scenario == Scenario::Balancer && opts.backends.is_empty() {
        anyhow::bail!("the balancer needs at least one --backend");
    }
    let shared = Arc::new(Shared {
        backends: opts.backends.clone(),
        next: AtomicUsize::new(0),
        primary: opts.primary.clone(),
        replica: opts.replica.clone(),
        replica_every: opts.replica_every,
    });
    let opts = Arc::new(opts);
    let mut handles = Vec::new();
    let workers = match opts.scenario {
        Scenario::StarvedWorkers => {
            let (tx, rx) = mpsc::channel::<TcpStream>();
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..opts.workers.max(1) {
                let rx = Arc::clone(&rx);
                let opts = Arc::clone(&opts);
                let shared = Arc::clone(&shared);
                handles.push(thread::spawn(move || loop {
                    let next = rx.lock().expect("queue lock").recv();
                    let Ok(stream) = next else { break };
                    let _ = serve_connection(stream, &opts, &shared);
                }));
            }
            Some(tx)
        }
        _ => None,
    };
    let mut served = 0;
    loop {
        if opts.scenario == Scenario::SlowAccept {
            thread::sleep(Duration::from_millis(opts.delay_ms));
        }
        let (stream, _) = listener.accept()?;
        served += 1;
        match &workers {
            Some(tx) => tx.send(stream).expect("workers alive"),
            None => {
                let opts = Arc::clone(&opts);
                let shared = Arc::clone(&shared);
                handles.push(thread::spawn(move || {
                    if let Err(e) = serve_connection(stream, &opts, &shared) {
                        if opts.scenario == Scenario::Database || opts.scenario == Scenario::Balancer {
                            eprintln!("lab server: {e:#}");
                        }
                    }
                }));
            }
        }
        if opts.max_connections > 0 && served >= opts.max_connections {
            break;
        }
    }
    drop(workers);
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// SO_LINGER with a zero timeout: close() resets the connection instead of ending it.
pub fn set_linger_zero(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    anyhow::ensure!(rc == 0, "setsockopt(SO_LINGER): {}", std::io::Error::last_os_error());
    Ok(())
}

/// Sets a socket's send buffer (a small one makes a large write block on a late reader).
pub fn set_sndbuf(stream: &TcpStream, bytes: i32) -> Result<()> {
    set_sockopt(stream, libc::SO_SNDBUF, bytes)
}

/// Sets a socket's receive buffer (for slow-reader clients).
pub fn set_rcvbuf(stream: &TcpStream, bytes: i32) -> Result<()> {
    set_sockopt(stream, libc::SO_RCVBUF, bytes)
}

fn set_sockopt(stream: &TcpStream, option: i32, bytes: i32) -> Result<()> {
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    anyhow::ensure!(rc == 0, "setsockopt({option}): {}", std::io::Error::last_os_error());
    Ok(())
}
