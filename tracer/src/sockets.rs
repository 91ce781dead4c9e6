//! The TCP connections a traced process already has open when tracing starts, read from
//! `/proc/PID/net/tcp{,6}`: which of them are upstream connections (the process opened
//! them) rather than connections it accepted. The kernel programs cannot tell the two
//! apart for a connection they did not see open, so userspace tells them, by tuple; and
//! the ports it listens on, whose connections' setups the programs record.

use std::{
    collections::HashSet,
    fs,
    net::{IpAddr, Ipv6Addr},
};

use tracer_common::TupleKey;

const ESTABLISHED: u8 = 0x01;
const LISTEN: u8 = 0x0a;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
    state: u8,
    inode: u64,
}

/// `ADDR:PORT` as /proc prints it: the address as 32-bit words in host byte order.
fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::from(u32::from_str_radix(addr, 16).ok()?.to_ne_bytes()),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::from(bytes)
        }
        _ => return None,
    };
    Some((ip, port))
}

fn parse_table(text: &str) -> Vec<Entry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(Entry {
                local: parse_endpoint(f.get(1)?)?,
                remote: parse_endpoint(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Established connections among `entries` whose inode is in `owned` and whose local
/// port is not a listening port of the namespace.
fn upstream_tuples(entries: &[Entry], owned: &HashSet<u64>) -> Vec<TupleKey> {
    let listening: Vec<(IpAddr, u16)> = entries.iter().filter(|e| e.state == LISTEN).map(|e| e.local).collect();
    let accepted = |e: &Entry| {
        listening.iter().any(|&(ip, port)| {
            port == e.local.1 && (ip == e.local.0 || ip.is_unspecified() || ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        })
    };
    entries
        .iter()
        .filter(|e| e.state == ESTABLISHED && owned.contains(&e.inode) && !accepted(e))
        .map(|e| TupleKey { local_port: e.local.1, remote_port: e.remote.1, _pad: 0, remote_addr: mapped(e.remote.0) })
        .collect()
}

/// Whether a TCP socket listens on `port` in the tracer's network namespace.
pub fn is_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .flat_map(|text| parse_table(&text))
        .any(|e| e.state == LISTEN && e.local.1 == port)
}

/// What process `pid` has open now, from one reading of its sockets.
pub struct OpenSockets {
    /// Its upstream connections.
    pub upstreams: Vec<TupleKey>,
    /// The ports it listens on (read without sock_diag, which a kernel may lack: the
    /// programs record setups only on these ports, see `Probes::filter_setups`).
    pub listening: Vec<u16>,
}

pub fn open_sockets(pid: u32) -> OpenSockets {
    let (entries, owned) = tcp_sockets(pid);
    OpenSockets { upstreams: upstream_tuples(&entries, &owned), listening: listening(&entries, &owned) }
}

/// The ports of the listening sockets among `entries` whose inode is in `owned`.
fn listening(entries: &[Entry], owned: &HashSet<u64>) -> Vec<u16> {
    entries.iter().filter(|e| e.state == LISTEN && owned.contains(&e.inode)).map(|e| e.local.1).collect()
}

/// The TCP sockets of `pid`'s network namespace, and the inodes of those it holds.
fn tcp_sockets(pid: u32) -> (Vec<Entry>, HashSet<u64>) {
    let owned = crate::procs::socket_inodes(pid);
    let mut entries = Vec::new();
    if owned.is_empty() {
        return (entries, owned);
    }
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            entries.extend(parse_table(&text));
        }
    }
    (entries, owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 101 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:C351 0200007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 102 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:C352 0200007F:1539 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn parses_addresses_in_host_word_order() {
        let e = parse_table(TCP);
        assert_eq!(e.len(), 4);
        assert_eq!(e[1].local, ("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!(e[2].remote, ("127.0.0.2".parse().unwrap(), 5432));
        assert_eq!(e[0].state, LISTEN);
        assert_eq!(e[2].inode, 102);
        let v6 = parse_endpoint("00000000000000000000000001000000:0050").unwrap();
        assert_eq!(v6, ("::1".parse().unwrap(), 80));
    }

    #[test]
    fn a_process_listens_on_the_listening_sockets_it_holds() {
        let entries = parse_table(TCP);
        assert_eq!(listening(&entries, &[100, 101].into()), vec![8080]);
        assert!(listening(&entries, &[101, 102, 999].into()).is_empty(), "no listener of its own");
    }

    #[test]
    fn accepted_connections_and_other_processes_sockets_are_not_upstreams() {
        let owned: HashSet<u64> = [100, 101, 102].into();
        let tuples = upstream_tuples(&parse_table(TCP), &owned);
        assert_eq!(
            tuples,
            vec![TupleKey {
                local_port: 0xC351,
                remote_port: 5432,
                _pad: 0,
                remote_addr: mapped("127.0.0.2".parse().unwrap())
            }]
        );
    }
}
