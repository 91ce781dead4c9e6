//! The traced processes' listening sockets and their listen drops.
//!
//! The kernel counts a listen drop (a SYN or handshake-completing ACK dropped because the
//! listener's SYN or accept queue was full) in the listener's own drop counter, which
//! sock_diag reports (`SK_MEMINFO_DROPS`). An ACK dropped on a full accept queue is
//! counted there twice, once by the TCP code and once when the packet is discarded; the
//! kernel programs count those ACKs per listener (by socket cookie), so
//!
//! ```text
//! listen drops = Δ drop counter − Δ overflowed ACKs
//! ```
//!
//! which matches the namespace's `ListenDrops` counter. Listeners are found per network
//! namespace (a netlink socket opened inside each traced process's namespace) and are the
//! traced processes' when one of their file descriptors is the listening socket (PID
//! mode) or when their port is traced (port mode).
//!
//! A listener is a port in a network namespace ([`ListenerId`]): every container that
//! listens on 8080 does so in its own. The addresses its sockets are bound to (0.0.0.0
//! and `::` for a dual-stack server) are shown with it, not part of its identity.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    fs::{self, File},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{bail, Context as _, Result};
use log::{debug, warn};

use crate::procs;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;
const INET_DIAG_SKMEMINFO: u16 = 7;
/// The socket's cgroup (v2) id, which the kernel adds to every reply (5.9 and later).
const INET_DIAG_CGROUP_ID: u16 = 21;
const SK_MEMINFO_DROPS: usize = 8;
const NLMSG_HDR_LEN: usize = 16;
const INET_DIAG_MSG_LEN: usize = 72;

/// A listener: a local port in a network namespace (the namespace's inode number, as
/// `/proc/PID/ns/net` shows it; 0 when unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerId {
    pub port: u16,
    pub netns: u32,
}

impl ListenerId {
    pub fn new(port: u16, netns: u32) -> Self {
        Self { port, netns }
    }

    /// Whether the listener is in another network namespace than the tracer's (a
    /// container's): its port alone does not name it.
    pub fn elsewhere(&self) -> bool {
        self.netns != 0 && self.netns != own_netns()
    }
}

/// `:8080` in the tracer's own network namespace, `:8080@4026532301` in another.
impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ":{}", self.port)?;
        if self.elsewhere() {
            write!(f, "@{}", self.netns)?;
        }
        Ok(())
    }
}

/// The inode number of the tracer's own network namespace (0 if unreadable).
pub fn own_netns() -> u32 {
    static OWN: OnceLock<u32> = OnceLock::new();
    *OWN.get_or_init(|| netns_of(None).map_or(0, |(ino, _)| ino as u32))
}

/// One listening socket as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u32,
    pub cookie: u64,
    pub drops: u32,
    /// The cgroup (v2) the socket belongs to: the one its creator was in, which its
    /// connections inherit (`None` before 5.9).
    pub cgroup: Option<u64>,
}

/// A `NETLINK_SOCK_DIAG` socket bound to one network namespace.
struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
}

impl DiagSocket {
    /// Opens the socket inside the namespace `netns` (a `/proc/PID/ns/net` path): a
    /// netlink socket stays in the namespace it was created in, so a short-lived thread
    /// enters the namespace, creates it and exits.
    fn open_in(netns: &Path) -> Result<Self> {
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let fd = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<OwnedFd> {
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = unsafe {
                    libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .join()
            .expect("namespace thread does not panic")
        })
        .with_context(|| format!("opening a sock_diag socket in network namespace {}", netns.display()))?;
        Ok(Self { fd, seq: 0 })
    }

    /// Every TCP listener of `family` in the namespace.
    fn dump(&mut self, family: u8) -> Result<Vec<Listening>> {
        self.seq += 1;
        let request = dump_request(family, self.seq);
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
        if sent < 0 {
            bail!("sock_diag request: {}", io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("sock_diag reply: {err}");
            }
            if parse_reply(&buf[..n as usize], self.seq, &mut out)? {
                return Ok(out);
            }
        }
    }
}

fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + 56;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2
    m.push(family);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(1 << (INET_DIAG_SKMEMINFO - 1));
    m.push(0);
    m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: match everything
    m
}

fn u16_ne(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one datagram of a dump reply into `out`; true when the dump is complete.
fn parse_reply(mut buf: &[u8], seq: u32, out: &mut Vec<Listening>) -> Result<bool> {
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32_ne(buf, 0) as usize;
        let kind = u16_ne(buf, 4);
        if len < NLMSG_HDR_LEN || len > buf.len() {
            bail!("malformed sock_diag reply (message length {len})");
        }
        let body = &buf[NLMSG_HDR_LEN..len];
        if u32_ne(buf, 8) == seq {
            match kind as i32 {
                libc::NLMSG_DONE => return Ok(true),
                libc::NLMSG_ERROR => {
                    let errno = if body.len() >= 4 { -(u32_ne(body, 0) as i32) } else { 0 };
                    if errno != 0 {
                        bail!("sock_diag: {}", io::Error::from_raw_os_error(errno));
                    }
                }
                _ if kind == SOCK_DIAG_BY_FAMILY => {
                    if let Some(l) = parse_listener(body) {
                        out.push(l);
                    }
                }
                _ => {}
            }
        }
        buf = &buf[(len + 3) & !3..];
    }
    Ok(false)
}

/// `struct inet_diag_msg` followed by attributes, of which only the memory info is used.
fn parse_listener(body: &[u8]) -> Option<Listening> {
    if body.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let port = u16::from_be_bytes([body[4], body[5]]);
    let src: [u8; 16] = body[8..24].try_into().expect("16 bytes");
    let addr = if body[0] == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(src))
    };
    let cookie = u32_ne(body, 44) as u64 | (u32_ne(body, 48) as u64) << 32;
    let inode = u32_ne(body, 68);
    let mut drops = None;
    let mut cgroup = None;
    let mut attrs = &body[INET_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = u16_ne(attrs, 0) as usize;
        if len < 4 || len > attrs.len() {
            break;
        }
        if u16_ne(attrs, 2) == INET_DIAG_SKMEMINFO && len >= 4 + (SK_MEMINFO_DROPS + 1) * 4 {
            drops = Some(u32_ne(attrs, 4 + SK_MEMINFO_DROPS * 4));
        }
        if u16_ne(attrs, 2) == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup = Some(u32_ne(attrs, 4) as u64 | (u32_ne(attrs, 8) as u64) << 32);
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    Some(Listening { addr, port, inode, cookie, drops: drops?, cgroup })
}

fn netns_of(pid: Option<u32>) -> Option<(u64, PathBuf)> {
    let path = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        None => PathBuf::from("/proc/self/ns/net"),
    };
    let inode = fs::metadata(&path).ok()?.ino();
    Some((inode, path))
}

struct Tracked {
    id: ListenerId,
    addr: SocketAddr,
    cgroup: Option<u64>,
    drops_base: u32,
    drops: u32,
    overflows_base: u64,
    overflows: u64,
}

impl Tracked {
    fn listen_drops(&self) -> u64 {
        let counted = self.drops.wrapping_sub(self.drops_base) as u64;
        counted.saturating_sub(self.overflows.saturating_sub(self.overflows_base))
    }
}

/// The traced listeners and their listen drops since tracing started.
pub struct ListenerWatch {
    /// Port mode: listeners on these ports are traced, whoever owns them.
    ports: Vec<u16>,
    /// `--all`: every listener of the tracer's network namespace.
    all: bool,
    sockets: HashMap<u64, DiagSocket>,
    tracked: HashMap<(u64, u64), Tracked>,
    not_ours: HashSet<(u64, u32)>,
    refreshed: bool,
    warned: bool,
}

impl ListenerWatch {
    pub fn new(ports: &[u16], all: bool) -> Self {
        Self {
            ports: ports.to_vec(),
            all,
            sockets: HashMap::new(),
            tracked: HashMap::new(),
            not_ours: HashSet::new(),
            refreshed: false,
            warned: false,
        }
    }

    /// Reads the listeners of `pids` (or of the traced ports, in the tracer's own
    /// namespace) and their counters. `overflows` gives the overflowed-ACK count the
    /// kernel programs keep for a listener cookie. Failures are logged, not fatal: the
    /// phases do not depend on this.
    pub fn refresh(&mut self, pids: &HashSet<u32>, overflows: impl Fn(u64) -> u64) {
        if let Err(e) = self.try_refresh(pids, &overflows) {
            if !self.warned {
                warn!("listen drops unavailable: {e:#}");
                self.warned = true;
            }
        }
        self.refreshed = true;
    }

    fn try_refresh(&mut self, pids: &HashSet<u32>, overflows: &dyn Fn(u64) -> u64) -> Result<()> {
        // Network namespace → the traced processes in it. In port mode and with
        // `--all`, the tracer's own namespace and those of the processes seen serving.
        let mut namespaces: HashMap<u64, (PathBuf, Vec<u32>)> = HashMap::new();
        for &pid in pids {
            if let Some((ino, path)) = netns_of(Some(pid)) {
                namespaces.entry(ino).or_insert_with(|| (path, Vec::new())).1.push(pid);
            }
        }
        if !self.ports.is_empty() || self.all {
            if let Some((ino, path)) = netns_of(None) {
                namespaces.entry(ino).or_insert_with(|| (path, Vec::new()));
            }
        }
        for (ns, (path, ns_pids)) in namespaces {
            if !self.sockets.contains_key(&ns) {
                self.sockets.insert(ns, DiagSocket::open_in(&path)?);
            }
            let socket = self.sockets.get_mut(&ns).expect("just inserted");
            let mut listening = socket.dump(libc::AF_INET as u8)?;
            listening.extend(socket.dump(libc::AF_INET6 as u8)?);
            debug!("netns {ns}: {} listening sockets", listening.len());
            let mut owned: Option<HashSet<u64>> = None;
            for l in listening {
                if let Some(t) = self.tracked.get_mut(&(ns, l.cookie)) {
                    t.drops = l.drops;
                    t.overflows = overflows(l.cookie);
                    if t.drops != t.drops_base {
                        debug!(
                            "listener {}: drop counter +{}, overflowed handshake ACKs +{}",
                            t.id,
                            t.drops.wrapping_sub(t.drops_base),
                            t.overflows - t.overflows_base
                        );
                    }
                    continue;
                }
                if self.not_ours.contains(&(ns, l.inode)) {
                    continue;
                }
                let ours = if self.all {
                    true
                } else if self.ports.is_empty() {
                    owned
                        .get_or_insert_with(|| ns_pids.iter().flat_map(|&p| procs::socket_inodes(p)).collect())
                        .contains(&(l.inode as u64))
                } else {
                    self.ports.contains(&l.port)
                };
                if !ours {
                    self.not_ours.insert((ns, l.inode));
                    continue;
                }
                debug!("traced listener {}:{} (inode {}, netns {ns})", l.addr, l.port, l.inode);
                // Listeners present when tracing started count from then; later ones
                // from their creation.
                let (drops_base, overflows_base) = if self.refreshed { (0, 0) } else { (l.drops, overflows(l.cookie)) };
                self.tracked.insert(
                    (ns, l.cookie),
                    Tracked {
                        id: ListenerId::new(l.port, ns as u32),
                        addr: SocketAddr::new(l.addr, l.port),
                        cgroup: l.cgroup,
                        drops_base,
                        drops: l.drops,
                        overflows_base,
                        overflows: overflows(l.cookie),
                    },
                );
            }
        }
        Ok(())
    }

    /// The ports of the traced listeners found so far.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.tracked.values().map(|t| t.id.port)
    }

    /// The cgroups (v2, by id) of the traced listeners' sockets, where their connections
    /// belong whichever cgroup the process serving them is in now.
    pub fn cgroups(&self) -> BTreeSet<u64> {
        self.tracked.values().filter_map(|t| t.cgroup).collect()
    }

    /// Listen drops since tracing started, per listener.
    pub fn drops(&self) -> BTreeMap<ListenerId, u64> {
        let mut out = BTreeMap::new();
        for t in self.tracked.values() {
            *out.entry(t.id).or_default() += t.listen_drops();
        }
        out
    }

    /// The addresses the listeners' sockets are bound to.
    pub fn addresses(&self) -> BTreeMap<ListenerId, BTreeSet<SocketAddr>> {
        let mut out: BTreeMap<ListenerId, BTreeSet<SocketAddr>> = BTreeMap::new();
        for t in self.tracked.values() {
            out.entry(t.id).or_default().insert(t.addr);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR_LEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn diag_msg(port: u16, inode: u32, cookie: u64, drops: u32) -> Vec<u8> {
        let mut b = diag_msg_without_cgroup(port, inode, cookie, drops);
        // The cgroup id, last (as the kernel puts it, after a padding attribute).
        b.extend_from_slice(&4u16.to_ne_bytes());
        b.extend_from_slice(&20u16.to_ne_bytes());
        b.extend_from_slice(&12u16.to_ne_bytes());
        b.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        b.extend_from_slice(&(0x2_0000_0000 + inode as u64).to_ne_bytes());
        b
    }

    fn diag_msg_without_cgroup(port: u16, inode: u32, cookie: u64, drops: u32) -> Vec<u8> {
        let mut b = vec![0u8; INET_DIAG_MSG_LEN];
        b[0] = libc::AF_INET as u8;
        b[1] = TCP_LISTEN as u8;
        b[4..6].copy_from_slice(&port.to_be_bytes());
        b[8..12].copy_from_slice(&[127, 0, 0, (port % 200) as u8]);
        b[44..48].copy_from_slice(&(cookie as u32).to_ne_bytes());
        b[48..52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        b[68..72].copy_from_slice(&inode.to_ne_bytes());
        // An unrelated attribute first, then the memory info (9 counters).
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&99u16.to_ne_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&((4 + 9 * 4) as u16).to_ne_bytes());
        b.extend_from_slice(&INET_DIAG_SKMEMINFO.to_ne_bytes());
        for i in 0..9u32 {
            b.extend_from_slice(&(if i as usize == SK_MEMINFO_DROPS { drops } else { 1000 + i }).to_ne_bytes());
        }
        b
    }

    #[test]
    fn parses_listeners_and_their_drop_counters() {
        let mut reply = message(SOCK_DIAG_BY_FAMILY, 7, &diag_msg(8080, 4242, 0x1_0000_0002, 5));
        reply.extend(message(SOCK_DIAG_BY_FAMILY, 7, &diag_msg(443, 17, 9, 0)));
        let mut out = Vec::new();
        assert!(!parse_reply(&reply, 7, &mut out).unwrap());
        assert_eq!(
            out,
            vec![
                Listening {
                    addr: [127, 0, 0, 80].into(),
                    port: 8080,
                    inode: 4242,
                    cookie: 0x1_0000_0002,
                    drops: 5,
                    cgroup: Some(0x2_0000_0000 + 4242),
                },
                Listening {
                    addr: [127, 0, 0, 43].into(),
                    port: 443,
                    inode: 17,
                    cookie: 9,
                    drops: 0,
                    cgroup: Some(0x2_0000_0000 + 17)
                },
            ]
        );
        // Before 5.9 there is no cgroup id.
        let mut out = Vec::new();
        parse_reply(&message(SOCK_DIAG_BY_FAMILY, 7, &diag_msg_without_cgroup(80, 1, 1, 1)), 7, &mut out).unwrap();
        assert_eq!(out[0].cgroup, None);
        assert!(parse_reply(&message(libc::NLMSG_DONE as u16, 7, &[0; 4]), 7, &mut out).unwrap());
    }

    #[test]
    fn reports_netlink_errors_and_ignores_other_sequences() {
        let err = message(libc::NLMSG_ERROR as u16, 3, &(-libc::EPERM).to_ne_bytes());
        assert!(parse_reply(&err, 3, &mut Vec::new()).is_err());
        let mut out = Vec::new();
        assert!(!parse_reply(&message(SOCK_DIAG_BY_FAMILY, 2, &diag_msg(1, 1, 1, 1)), 3, &mut out).unwrap());
        assert!(out.is_empty());
    }

    #[test]
    fn overflowed_acks_are_not_counted_twice() {
        // 3 SYNs dropped (counted once each) and 2 overflowed ACKs (twice each) since start.
        let (id, addr) = (ListenerId::new(80, 1), "0.0.0.0:80".parse().unwrap());
        let t =
            Tracked { id, addr, cgroup: None, drops_base: 10, drops: 10 + 3 + 2 * 2, overflows_base: 1, overflows: 3 };
        assert_eq!(t.listen_drops(), 5);
        // Counter wrap-around.
        let t = Tracked { id, addr, cgroup: None, drops_base: u32::MAX, drops: 1, overflows_base: 0, overflows: 0 };
        assert_eq!(t.listen_drops(), 2);
    }
}
