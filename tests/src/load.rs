//! Load for the real-server tests: keep-alive HTTP/1.1 connections in parallel, each
//! request's path chosen by the test, and clients that reset mid-request.

use std::{
    io::{BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{client::read_response, server::set_linger_zero};

/// `GET PATH HTTP/1.1` with a Host header; the connection stays open.
pub fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n")
}

/// `connections` connections in parallel, each making `requests` requests one after
/// another; request `i` of connection `c` asks for `path(c, i)`. Each connection is
/// closed (FIN) once its last response is read. The number of responses read.
pub fn run(
    server: SocketAddr,
    connections: usize,
    requests: usize,
    path: impl Fn(usize, usize) -> String + Sync,
) -> Result<usize> {
    thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                let path = &path;
                s.spawn(move || -> Result<usize> {
                    let stream = TcpStream::connect(server).with_context(|| format!("connecting to {server}"))?;
                    let mut writer = stream.try_clone()?;
                    let mut reader = BufReader::new(stream);
                    for i in 0..requests {
                        writer.write_all(get(&path(c, i)).as_bytes())?;
                        read_response(&mut reader, 0).with_context(|| format!("connection {c}, request {i}"))?;
                    }
                    Ok(requests)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("load thread")).sum()
    })
}

/// Makes `before` requests for `path`, then sends one for `slow_path` and, `after`
/// later (while the server still works on it), resets the connection (SO_LINGER 0).
pub fn reset_mid_request(
    server: SocketAddr,
    before: usize,
    path: &str,
    slow_path: &str,
    after: Duration,
) -> Result<()> {
    let stream = TcpStream::connect(server).with_context(|| format!("connecting to {server}"))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for _ in 0..before {
        writer.write_all(get(path).as_bytes())?;
        read_response(&mut reader, 0)?;
    }
    writer.write_all(get(slow_path).as_bytes())?;
    thread::sleep(after);
    set_linger_zero(&writer)?;
    Ok(())
}
