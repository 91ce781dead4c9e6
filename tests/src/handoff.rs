//! `lab hand-off`: a server that reads requests on one thread and has a pool of workers
//! answer them. The reader thread accepts connections and reads every request (poll
//! over all connections), then hands it to the pool; a worker calls a backend for it,
//! waits locally if asked, and writes the response. The server times itself: from the
//! read that completed a request to the start of the write of its response (handling),
//! and each backend call from its request's write to the end of its response.
//!
//! Request: `GET /?peer=I&local=MS`: call backend I (`--backend`, in order) with a lab
//! request, then sleep MS, then answer `ok`. A line on stdin (or its end) makes the
//! server print its own times on stdout as `key=value` pairs: `requests`,
//! `handling_ns`, and per backend I `calls_I` and `upstream_ns_I`.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        mpsc::{self, Receiver, Sender},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::client::{read_response, request_text};

#[derive(Debug, Clone, clap::Args)]
pub struct HandOffOptions {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Backends the requests name by index (repeat the option).
    #[arg(long = "backend")]
    pub backends: Vec<SocketAddr>,
}

struct Job {
    stream: TcpStream,
    /// When the read that completed the request returned.
    read_at: Instant,
    peer: usize,
    local: Duration,
}

#[derive(Default)]
struct Truth {
    requests: u64,
    handling_ns: u64,
    calls: Vec<u64>,
    upstream_ns: Vec<u64>,
}

/// The backend index and local wait a request line asks for.
fn parse(head: &[u8]) -> (usize, Duration) {
    let line = String::from_utf8_lossy(head);
    let query = line.split_whitespace().nth(1).and_then(|p| p.split_once('?')).map(|(_, q)| q).unwrap_or("");
    let (mut peer, mut local) = (0, 0);
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("peer", v)) => peer = v.parse().unwrap_or(0),
            Some(("local", v)) => local = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    (peer, Duration::from_millis(local))
}

/// Accepts and reads on one thread; every complete request goes to the pool.
fn reader(listener: TcpListener, jobs: Sender<Job>) -> Result<()> {
    let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(conns.iter().map(|(s, _)| s.as_raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("poll: {e}");
        }
        let mut closed = Vec::new();
        for (i, fd) in fds[1..].iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let (stream, buf) = &mut conns[i];
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).unwrap_or(0);
            let read_at = Instant::now();
            if n == 0 {
                closed.push(i);
                continue;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = buf.drain(..end + 4).collect();
                let (peer, local) = parse(&head);
                jobs.send(Job { stream: stream.try_clone()?, read_at, peer, local })?;
            }
        }
        for i in closed.into_iter().rev() {
            conns.remove(i);
        }
        if fds[0].revents != 0 {
            let (stream, _) = listener.accept()?;
            conns.push((stream, Vec::new()));
        }
    }
}

/// Takes requests from the pool's queue: calls the backend (one keep-alive connection
/// per backend and worker), waits locally, answers, and records the times.
fn worker(jobs: Arc<Mutex<Receiver<Job>>>, backends: Vec<SocketAddr>, truth: Arc<Mutex<Truth>>) -> Result<()> {
    let mut upstreams: HashMap<usize, (TcpStream, BufReader<TcpStream>)> = HashMap::new();
    loop {
        let next = jobs.lock().expect("queue lock").recv();
        let Ok(mut job) = next else { return Ok(()) };
        let addr = *backends.get(job.peer).with_context(|| format!("no backend {}", job.peer))?;
        if !upstreams.contains_key(&job.peer) {
            let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            let reader = BufReader::new(stream.try_clone()?);
            upstreams.insert(job.peer, (stream, reader));
        }
        let (writer, reader) = upstreams.get_mut(&job.peer).expect("just connected");
        let call = Instant::now();
        writer.write_all(request_text(100, false).as_bytes())?;
        read_response(reader, 0)?;
        let upstream = call.elapsed();
        thread::sleep(job.local);
        let write_at = Instant::now();
        job.stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
        let mut t = truth.lock().expect("truth lock");
        t.requests += 1;
        t.handling_ns += (write_at - job.read_at).as_nanos() as u64;
        t.calls[job.peer] += 1;
        t.upstream_ns[job.peer] += upstream.as_nanos() as u64;
    }
}

/// Prints `listening on ADDR`, serves until a line (or the end) on stdin, then prints
/// its own times.
pub fn run(opts: HandOffOptions) -> Result<()> {
    let listener = TcpListener::bind(opts.listen).with_context(|| format!("binding {}", opts.listen))?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let n = opts.backends.len();
    let truth = Arc::new(Mutex::new(Truth { calls: vec![0; n], upstream_ns: vec![0; n], ..Truth::default() }));
    let (tx, rx) = mpsc::channel();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..opts.workers.max(1) {
        let (rx, truth, backends) = (Arc::clone(&rx), Arc::clone(&truth), opts.backends.clone());
        thread::spawn(move || {
            if let Err(e) = worker(rx, backends, truth) {
                eprintln!("lab hand-off worker: {e:#}");
            }
        });
    }
    thread::spawn(move || {
        if let Err(e) = reader(listener, tx) {
            eprintln!("lab hand-off reader: {e:#}");
        }
    });
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let t = truth.lock().expect("truth lock");
    let mut out = format!("requests={} handling_ns={}", t.requests, t.handling_ns);
    for i in 0..n {
        out += &format!(" calls_{i}={} upstream_ns_{i}={}", t.calls[i], t.upstream_ns[i]);
    }
    println!("{out}");
    std::io::stdout().flush()?;
    Ok(())
}
