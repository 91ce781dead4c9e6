//! `lab hold`: many concurrently open connections, for the scale benchmark. Each
//! connection comes from one of several loopback source addresses (one address has
//! only about 28,000 ephemeral ports), makes one request, and stays open until told to
//! close.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
};

use anyhow::{ensure, Context as _, Result};

use crate::client::{read_response, request_text};

#[derive(Debug, Clone, clap::Args)]
pub struct HoldOptions {
    #[arg(long)]
    pub server: SocketAddr,
    #[arg(long)]
    pub connections: usize,
    /// Source addresses 127.0.0.2, 127.0.0.3, … (this many).
    #[arg(long, default_value_t = 5)]
    pub sources: u8,
    /// The first source address is 127.0.0.(2 + this), so that several holders spread
    /// over different addresses.
    #[arg(long, default_value_t = 0)]
    pub source_offset: u8,
}

/// Raises the soft file limit to `n`, within the hard limit (raising that needs
/// CAP_SYS_RESOURCE, which containers often lack: run several `lab hold` instead).
fn raise_fd_limit(n: u64) -> Result<()> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    ensure!(
        n <= limit.rlim_max,
        "{n} files are over the hard limit of {}: split the connections over several `lab hold`",
        limit.rlim_max
    );
    limit.rlim_cur = n;
    ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0,
        "raising the file limit to {n}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn connect_from(source: Ipv4Addr, server: SocketAddr) -> Result<TcpStream> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // Let connect() pick the port per destination, so each source has all its ports.
    unsafe {
        libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, (&one as *const libc::c_int).cast(), 4)
    };
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as u16;
    sin.sin_addr.s_addr = u32::from_ne_bytes(source.octets());
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    ensure!(
        unsafe { libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len) } == 0,
        "bind {source}: {}",
        std::io::Error::last_os_error()
    );
    let SocketAddr::V4(v4) = server else { anyhow::bail!("IPv4 servers only") };
    sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
    sin.sin_port = v4.port().to_be();
    ensure!(
        unsafe { libc::connect(fd, (&sin as *const libc::sockaddr_in).cast(), len) } == 0,
        "connect from {source}: {}",
        std::io::Error::last_os_error()
    );
    Ok(stream)
}

/// Opens the connections, prints `open N`, waits for a line on stdin, closes them all
/// and prints `closed`.
pub fn run(opts: &HoldOptions) -> Result<()> {
    raise_fd_limit(opts.connections as u64 + 256)?;
    let mut held = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        let source = Ipv4Addr::new(127, 0, 0, 2 + opts.source_offset + (i % opts.sources.max(1) as usize) as u8);
        let mut stream = connect_from(source, opts.server).with_context(|| format!("connection {i}"))?;
        stream.write_all(request_text(10, false).as_bytes())?;
        let mut reader = BufReader::new(stream.try_clone()?);
        read_response(&mut reader, 0)?;
        held.push(stream);
    }
    println!("open {}", held.len());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    drop(held);
    println!("closed");
    Ok(())
}
