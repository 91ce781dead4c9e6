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
    /// A shop's JSON API, routed by path: `GET /products` lists every product (over a
    /// megabyte, whatever `size` says), `GET /productTypes` the few product types,
    /// `GET /products/{n}` one product; anything else is `404 Not Found`. A client that
    /// fetches the whole list to filter it itself shows in `GET /products`'s bytes out,
    /// `send` and `delivery`; one that reads the list D late blocks the server's writes
    /// for about D (`send`: the list is far larger than the 128 KiB send buffer).
    Shop,
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
    method: String,
    /// The request target without its query string.
    path: String,
    size: usize,
    close: bool,
    /// `delay=MS` in the query: sleep this long before answering, on top of the
    /// scenario's own work.
    delay: Duration,
}

/// Reads one request's headers; `None` at end of stream.
fn read_request(reader: &mut impl BufRead, default_size: usize) -> Result<Option<Request>> {
    let mut request =
        Request { method: String::new(), path: String::new(), size: default_size, close: false, delay: Duration::ZERO };
    let mut first = true;
    loop {
        // Any bytes make a request line, as for a real server (a test sends invalid
        // UTF-8 in paths): the request is answered, not the connection dropped.
        let mut bytes = Vec::new();
        if reader.read_until(b'\n', &mut bytes)? == 0 {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(&bytes);
        if first {
            first = false;
            let mut words = line.split_whitespace();
            request.method = words.next().unwrap_or_default().to_owned();
            let target = words.next().unwrap_or_default();
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            request.path = path.to_owned();
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("size", v)) => request.size = v.parse().unwrap_or(default_size),
                    Some(("delay", v)) => request.delay = Duration::from_millis(v.parse().unwrap_or(0)),
                    _ => {}
                }
            }
        } else if line == "\r\n" || line == "\n" {
            return Ok(Some(request));
        } else if line.to_ascii_lowercase().starts_with("connection: close") {
            request.close = true;
        }
    }
}

/// The status line and headers of every lab response.
fn response_head(status: u16, reason: &str, length: usize, close: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {length}\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Products in the shop's list.
pub const SHOP_PRODUCTS: u32 = 20_000;
/// Product types (`GET /productTypes`).
const SHOP_TYPES: [&str; 8] = ["books", "music", "games", "garden", "kitchen", "tools", "toys", "sports"];
/// The shop's send buffer, far smaller than the list: a client that reads the list D
/// late blocks the server's writes for about D (`GET /products`'s `send`), and the
/// buffer's last bytes are delivered once it reads (`delivery`). Fixed rather than
/// autotuned, and under the default `net.core.wmem_max` (212992) that caps it, so that the
/// split between the two is the same on every machine.
const SHOP_SNDBUF: i32 = 128 << 10;
/// The size of each write of a shop response after the first.
const SHOP_WRITE: usize = 64 << 10;

/// A shop answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShopResponse {
    pub status: u16,
    pub reason: &'static str,
    pub body: std::borrow::Cow<'static, [u8]>,
}

fn price(n: u64) -> String {
    let cents = n.wrapping_mul(7919) % 100_000 + 99;
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// The shop's answer to `method path` (the path without its query string): the same
/// bytes for the same request, every time.
pub fn shop_route(method: &str, path: &str) -> ShopResponse {
    use std::{borrow::Cow, sync::OnceLock};
    static PRODUCTS: OnceLock<Vec<u8>> = OnceLock::new();
    let ok = |body: Cow<'static, [u8]>| ShopResponse { status: 200, reason: "OK", body };
    // `/products/{n}` for a number n; `/products/abc` is no product.
    let product = path
        .strip_prefix("/products/")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok());
    match (method, path, product) {
        ("GET", "/products", _) => ok(Cow::Borrowed(PRODUCTS.get_or_init(|| {
            // Built once: the list is what the shop has, not work each request pays for.
            let items: Vec<String> = (1..=SHOP_PRODUCTS as u64)
                .map(|n| {
                    format!(
                        r#"{{"id":{n},"name":"Product {n}","typeId":{},"price":{},"inStock":{}}}"#,
                        n as usize % SHOP_TYPES.len() + 1,
                        price(n),
                        n % 7 != 0
                    )
                })
                .collect();
            format!("[{}]", items.join(",")).into_bytes()
        }))),
        ("GET", "/productTypes", _) => {
            let types: Vec<String> =
                SHOP_TYPES.iter().enumerate().map(|(i, t)| format!(r#"{{"id":{},"name":"{t}"}}"#, i + 1)).collect();
            ok(Cow::Owned(format!("[{}]", types.join(",")).into_bytes()))
        }
        ("GET", _, Some(n)) => {
            let kind = SHOP_TYPES[n as usize % SHOP_TYPES.len()];
            ok(Cow::Owned(
                format!(
                    r#"{{"id":{n},"name":"Product {n}","typeId":{},"type":"{kind}","price":{},"inStock":{},"sku":"SKU-{n:08}","description":"Product {n}, from the {kind} range: sturdy, well reviewed and shipped within two working days. Its details, unlike the whole list, fit in a few hundred bytes."}}"#,
                    n as usize % SHOP_TYPES.len() + 1,
                    price(n),
                    n % 7 != 0
                )
                .into_bytes(),
            ))
        }
        _ => ShopResponse { status: 404, reason: "Not Found", body: Cow::Borrowed(b"not found\n") },
    }
}

fn serve_connection(stream: TcpStream, opts: &ServerOptions, shared: &Arc<Shared>) -> Result<()> {
    let mut upstreams = Upstreams::new(Arc::clone(shared));
    match opts.scenario {
        Scenario::SlowReader => set_sockopt(&stream, libc::SO_SNDBUF, 4 << 20)?,
        Scenario::BlockedWrite => set_sndbuf(&stream, 16 << 10)?,
        Scenario::Shop => set_sndbuf(&stream, SHOP_SNDBUF)?,
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
        if opts.scenario == Scenario::Shop {
            let response = shop_route(&request.method, &request.path);
            let mut head = response_head(response.status, response.reason, response.body.len(), request.close);
            // The list goes out in pieces, as a handler serializing it row by row would
            // write it: the response's writes span its whole transfer (`send`).
            let mut pieces = response.body.chunks(SHOP_WRITE);
            head.extend_from_slice(pieces.next().unwrap_or_default());
            writer.write_all(&head)?;
            for piece in pieces {
                writer.write_all(piece)?;
            }
            if request.close {
                break;
            }
            continue;
        }
        let header = response_head(200, "OK", request.size, request.close);
        let body = vec![b'x'; request.size];
        if opts.scenario == Scenario::BodyStall && request.size > 1 {
            let mut head = header;
            head.extend_from_slice(&body[..request.size - 1]);
            writer.write_all(&head)?;
            thread::sleep(delay);
            writer.write_all(&body[request.size - 1..])?;
        } else {
            let mut all = header;
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
        // The threads of connections already served let go: a handle kept to a finished
        // thread keeps its stack mapped (a long run of short connections would run out).
        handles.retain(|h| !h.is_finished());
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerOptions,
    }

    #[derive(Parser)]
    struct ClientCli {
        #[command(flatten)]
        client: crate::client::ClientOptions,
    }

    #[test]
    fn shop_routes_by_path() {
        let products = shop_route("GET", "/products");
        assert_eq!((products.status, products.reason), (200, "OK"));
        assert!(products.body.len() >= 1 << 20, "the list is {} bytes", products.body.len());
        assert_eq!(products, shop_route("GET", "/products"), "the list is the same every time");
        assert_eq!(products.body.iter().filter(|&&b| b == b'{').count(), SHOP_PRODUCTS as usize);

        let types = shop_route("GET", "/productTypes");
        assert_eq!(types.status, 200);
        assert!(!types.body.is_empty() && types.body.len() < 1024, "{} bytes", types.body.len());

        let one = shop_route("GET", "/products/42");
        assert_eq!(one.status, 200);
        assert!((200..1024).contains(&one.body.len()), "{} bytes", one.body.len());
        assert_eq!(one, shop_route("GET", "/products/42"));
        assert_ne!(one.body, shop_route("GET", "/products/43").body);

        for (method, path) in [
            ("GET", "/"),
            ("GET", "/products/"),
            ("GET", "/products/abc"),
            ("GET", "/products/+1"),
            ("GET", "/products/1/reviews"),
            ("GET", "/productTypes/1"),
            ("POST", "/products"),
            ("HEAD", "/productTypes"),
        ] {
            let r = shop_route(method, path);
            assert_eq!((r.status, r.reason), (404, "Not Found"), "{method} {path}");
            assert!(r.body.len() < 64);
        }
    }

    #[test]
    fn requests_are_routed_without_their_query() {
        let text = "GET /products?size=10&delay=5 HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n";
        let request = read_request(&mut text.as_bytes(), 100).unwrap().expect("a request");
        assert_eq!((request.method.as_str(), request.path.as_str()), ("GET", "/products"));
        assert_eq!((request.size, request.delay, request.close), (10, Duration::from_millis(5), true));
        let request = read_request(&mut "GET /productTypes HTTP/1.1\r\n\r\n".as_bytes(), 100).unwrap().unwrap();
        assert_eq!((request.path.as_str(), request.size, request.close), ("/productTypes", 100, false));
        let request = read_request(&mut &b"GET /a\xff\xfe HTTP/1.1\r\n\r\n"[..], 100).unwrap().unwrap();
        assert_eq!(request.path, "/a\u{fffd}\u{fffd}", "invalid UTF-8 is a request too");
    }

    /// The shop over loopback: the lab's framing, byte for byte, on one kept-alive
    /// connection per client run.
    #[test]
    fn shop_over_a_connection() {
        let opts = Arc::new(Cli::parse_from(["lab", "--scenario", "shop"]).server);
        let listener = listen("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let shared = Arc::new(Shared {
                backends: Vec::new(),
                next: AtomicUsize::new(0),
                primary: None,
                replica: None,
                replica_every: 1,
            });
            let (stream, _) = listener.accept().unwrap();
            serve_connection(stream, &opts, &shared).unwrap();
        });
        let paths = ["/productTypes", "/products?size=10", "/products/7?delay=1", "/nope", "/products"];
        let mut args = vec!["lab".to_owned(), "--server".to_owned(), addr.to_string()];
        for p in paths {
            args.extend(["--path".to_owned(), p.to_owned()]);
        }
        let client = ClientCli::parse_from(args).client;
        let results = crate::client::run(&client).unwrap();
        server.join().unwrap();

        assert_eq!(results.len(), 1);
        let r = &results[0];
        assert_eq!(r.requests, paths.len());
        let head = |status, reason, len, close| response_head(status, reason, len, close).len() as u64;
        for (i, (e, target)) in r.exchanges.iter().zip(paths).enumerate() {
            let route = shop_route("GET", target.split('?').next().unwrap());
            let close = i + 1 == paths.len();
            assert_eq!(e.target, target);
            assert_eq!(e.status, route.status, "{target}");
            assert_eq!(
                e.bytes_received,
                head(route.status, route.reason, route.body.len(), close) + route.body.len() as u64,
                "{target}"
            );
            assert_eq!(e.bytes_sent, crate::client::target_request_text(target, close).len() as u64);
        }
        assert_eq!(r.bytes_received, r.exchanges.iter().map(|e| e.bytes_received).sum::<u64>());
    }
}
