//! What the lab server waits on while it thinks: other lab servers behind a round-robin
//! balancer, PostgreSQL clusters, or its own CPU.

use std::{
    collections::HashMap,
    io::{BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::client::{read_response, request_text};

/// Shared by all connections of a server: where requests go next.
pub struct Shared {
    pub backends: Vec<SocketAddr>,
    pub next: AtomicUsize,
    pub primary: Option<String>,
    pub replica: Option<String>,
    pub replica_every: usize,
}

/// One serving thread's upstream connections, opened on first use and kept alive.
pub struct Upstreams {
    shared: Arc<Shared>,
    http: HashMap<SocketAddr, (TcpStream, BufReader<TcpStream>)>,
    primary: Option<postgres::Client>,
    replica: Option<postgres::Client>,
}

impl Upstreams {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared, http: HashMap::new(), primary: None, replica: None }
    }

    /// Forwards a request for `size` bytes to the next backend, round robin, and reads
    /// its whole response.
    pub fn balance(&mut self, size: usize) -> Result<()> {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let addr = self.shared.backends[n % self.shared.backends.len()];
        if !self.http.contains_key(&addr) {
            let stream = TcpStream::connect(addr).with_context(|| format!("connecting to backend {addr}"))?;
            let reader = BufReader::new(stream.try_clone()?);
            self.http.insert(addr, (stream, reader));
        }
        let (writer, reader) = self.http.get_mut(&addr).expect("just inserted");
        writer.write_all(request_text(size, false).as_bytes())?;
        read_response(reader, 0)?;
        Ok(())
    }

    /// Looks up one row by key: on the replica for one request in `replica_every`, on
    /// the primary otherwise.
    pub fn query(&mut self) -> Result<()> {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let every = self.shared.replica_every.max(1);
        let (slot, url) = if n % every == every - 1 {
            (&mut self.replica, self.shared.replica.as_deref())
        } else {
            (&mut self.primary, self.shared.primary.as_deref())
        };
        let url = url.context("no database given (--primary/--replica)")?;
        if slot.is_none() {
            *slot =
                Some(postgres::Client::connect(url, postgres::NoTls).with_context(|| format!("connecting to {url}"))?);
        }
        let client = slot.as_mut().expect("just connected");
        // The simple protocol: one round trip per query.
        let key = (n * 7919) % 1_000_000 + 1;
        let messages = client.simple_query(&format!("SELECT v FROM items WHERE k = {key}"))?;
        let rows = messages.iter().filter(|m| matches!(m, postgres::SimpleQueryMessage::Row(_))).count();
        anyhow::ensure!(rows == 1, "key {key}: {rows} rows");
        Ok(())
    }
}

/// Burns CPU for `d`: work done by the server itself.
pub fn spin(d: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < d {
        for i in 0..1000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
}
