//! The compatibility table: for every logical hook, the programs that can implement it,
//! best first, and what each needs of the kernel.
//!
//! Kernels differ in what they offer: tracepoints come and go between versions (the
//! socket send/receive/data-ready tracepoints arrived in 6.3/6.4), BPF trampolines
//! (fentry/fexit) may be missing or forbidden, kprobes may be compiled out. The loader
//! does not guess from version numbers: it tries each implementation in order — the
//! program must load (the verifier checks it against this kernel's types) and attach —
//! and keeps the first that works. Options can skip kinds of implementation, to test the
//! later ones on a kernel that has the earlier.
//!
//! Connect has no row of its own: a connect is seen from the state changes (SYN_SENT,
//! then ESTABLISHED or CLOSE), which every supported kernel has.

use std::{fmt, str::FromStr};

use tracer_common::ProgramConfig;

/// Kinds of kernel attachment, in the order they are preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// BTF-typed tracepoint: the cheapest, arguments typed by the kernel's BTF.
    TpBtf,
    /// Raw tracepoint: the same arguments, untyped.
    RawTp,
    /// Classic tracepoint under tracefs (a fixed record layout).
    TracePoint,
    /// BPF trampoline on a function's entry or return.
    FEntry,
    /// A BPF LSM hook (a trampoline too; the `bpf` LSM must be active).
    Lsm,
    /// Kernel probe on a function's entry or return.
    KProbe,
    /// A cgroup hook on socket addresses: runs only for the sockets of the cgroups it is
    /// attached to (the traced processes' and their listeners').
    CgroupSockAddr,
    /// A cgroup hook on the packets sockets receive: runs only for the sockets of the
    /// cgroups it is attached to (the traced processes' and their listeners').
    CgroupSkb,
    /// A cgroup hook on TCP socket operations (a passive connection established):
    /// runs only for the sockets of the cgroups it is attached to.
    CgroupSockOps,
    /// A BPF iterator over the machine's TCP sockets, run by the tracer itself.
    Iter,
    /// Probe on a user-space function: the TLS library's calls (not a kernel hook; skip
    /// it to follow TLS connections as without a usable library).
    UProbe,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::TpBtf,
        Kind::RawTp,
        Kind::TracePoint,
        Kind::FEntry,
        Kind::Lsm,
        Kind::KProbe,
        Kind::CgroupSockAddr,
        Kind::CgroupSkb,
        Kind::CgroupSockOps,
        Kind::Iter,
        Kind::UProbe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::TpBtf => "tp_btf",
            Kind::RawTp => "raw_tp",
            Kind::TracePoint => "tracepoint",
            Kind::FEntry => "fentry",
            Kind::Lsm => "lsm",
            Kind::KProbe => "kprobe",
            Kind::CgroupSockAddr => "cgroup_sock_addr",
            Kind::CgroupSkb => "cgroup_skb",
            Kind::CgroupSockOps => "sock_ops",
            Kind::Iter => "iter",
            Kind::UProbe => "uprobe",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fexit" => return Ok(Kind::FEntry),
            "kretprobe" => return Ok(Kind::KProbe),
            _ => {}
        }
        Kind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown kind of hook '{s}' (one of: {})", names.join(", "))
        })
    }
}

/// Where one program attaches.
#[derive(Debug, Clone, Copy)]
pub enum Attach {
    /// BTF-typed tracepoint, by tracepoint name.
    TpBtf(&'static str),
    /// Raw tracepoint, by tracepoint name.
    RawTp(&'static str),
    /// Classic tracepoint: category and name.
    TracePoint(&'static str, &'static str),
    /// Trampoline on a kernel function's entry (arguments).
    FEntry(&'static str),
    /// Trampoline on a kernel function's return (arguments and return value).
    FExit(&'static str),
    /// Probe on a kernel function's entry.
    KProbe(&'static str),
    /// Probe on a kernel function's return (return value only).
    KRetProbe(&'static str),
    /// BPF LSM hook, by hook name.
    Lsm(&'static str),
    /// Cgroup socket-address hook, by attach point (`getpeername4`): loaded with the
    /// others, attached to the cgroups of the traced processes and of their listeners'
    /// sockets as the session finds them (the root in port mode).
    CgroupSockAddr(&'static str),
    /// Cgroup socket-buffer hook on received packets, attached as `CgroupSockAddr` is.
    CgroupSkbIngress,
    /// Cgroup hook on TCP socket operations, attached as `CgroupSockAddr` is; with what
    /// it takes when that is less than the hook's whole ("setups").
    CgroupSockOps(Option<&'static str>),
    /// The TCP socket iterator that has the socket-operation program told of the state
    /// changes of the connections open as it attaches (`Probes::flag_open_sockets`):
    /// loaded, run once to show that the kernel lets it, and again for every cgroup
    /// added. Only where the socket-operation program is attached.
    TcpIter,
}

impl Attach {
    /// Attached to cgroups (those of the traced processes and of their listeners, as the
    /// session finds them), not to a hook of the whole kernel.
    pub fn on_cgroups(self) -> bool {
        matches!(self, Attach::CgroupSockAddr(_) | Attach::CgroupSkbIngress | Attach::CgroupSockOps(_))
    }

    pub fn kind(self) -> Kind {
        match self {
            Attach::TpBtf(_) => Kind::TpBtf,
            Attach::RawTp(_) => Kind::RawTp,
            Attach::TracePoint(..) => Kind::TracePoint,
            Attach::FEntry(_) | Attach::FExit(_) => Kind::FEntry,
            Attach::KProbe(_) | Attach::KRetProbe(_) => Kind::KProbe,
            Attach::Lsm(_) => Kind::Lsm,
            Attach::CgroupSockAddr(_) => Kind::CgroupSockAddr,
            Attach::CgroupSkbIngress => Kind::CgroupSkb,
            Attach::CgroupSockOps(_) => Kind::CgroupSockOps,
            Attach::TcpIter => Kind::Iter,
        }
    }
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attach::TpBtf(name) => write!(f, "tp_btf/{name}"),
            Attach::RawTp(name) => write!(f, "raw_tp/{name}"),
            Attach::TracePoint(category, name) => write!(f, "tracepoint/{category}/{name}"),
            Attach::FEntry(name) => write!(f, "fentry/{name}"),
            Attach::FExit(name) => write!(f, "fexit/{name}"),
            Attach::KProbe(name) => write!(f, "kprobe/{name}"),
            Attach::KRetProbe(name) => write!(f, "kretprobe/{name}"),
            Attach::Lsm(name) => write!(f, "lsm/{name}"),
            Attach::CgroupSockAddr(name) => write!(f, "cgroup/{name}"),
            Attach::CgroupSkbIngress => f.write_str("cgroup_skb/ingress"),
            Attach::CgroupSockOps(None) => f.write_str("sockops"),
            Attach::CgroupSockOps(Some(part)) => write!(f, "sockops ({part} only)"),
            Attach::TcpIter => f.write_str("sockops state calls (iter/tcp)"),
        }
    }
}

/// One program of an implementation.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The program's name in the kernel object.
    pub name: &'static str,
    pub attach: Attach,
    /// The implementation works without it (e.g. the old `accept` syscall, which some
    /// architectures do not have).
    pub optional: bool,
}

/// One way of implementing a hook: every (non-optional) program must load and attach.
#[derive(Debug)]
pub struct Implementation {
    pub programs: &'static [Program],
    /// What it needs of the kernel, for `tracer doctor` and the README.
    pub needs: &'static str,
}

impl Implementation {
    pub fn kind(&self) -> Kind {
        self.programs[0].attach.kind()
    }
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.programs.iter().map(|p| p.attach.to_string()).collect();
        f.write_str(&names.join(" + "))
    }
}

#[derive(Debug)]
pub struct Hook {
    /// Logical hook name, for messages.
    pub name: &'static str,
    /// What is lost without it.
    pub needed_for: &'static str,
    /// Tracing cannot start without it.
    pub required: bool,
    /// Phases that cannot be measured without it.
    pub phases: &'static [&'static str],
    /// Best first.
    pub implementations: &'static [Implementation],
    /// A fact about the kernel (from BTF) without which no implementation is of use:
    /// `Err(why)` skips them all.
    pub precondition: fn(&ProgramConfig) -> Result<(), &'static str>,
}

/// The precondition of hooks that have none.
fn always(_: &ProgramConfig) -> Result<(), &'static str> {
    Ok(())
}

impl Hook {
    /// Whether `program` names one of this hook's programs (for `--disable-hook`).
    pub fn has_program(&self, program: &str) -> bool {
        self.implementations.iter().flat_map(|i| i.programs).any(|p| p.name == program)
    }
}

const fn one(name: &'static str, attach: Attach) -> Program {
    Program { name, attach, optional: false }
}

/// A tracepoint hook: its BTF-typed program, then the same body as a raw tracepoint
/// (see the programs' `tracepoint_hook!`).
macro_rules! tracepoint_impls {
    ($tp:literal, $raw:literal, $since:literal) => {
        &[
            Implementation {
                programs: &[one($tp, Attach::TpBtf($tp))],
                needs: concat!("BTF and the tracepoint ", $tp, " (", $since, ")"),
            },
            Implementation {
                programs: &[one($raw, Attach::RawTp($tp))],
                needs: concat!("the tracepoint ", $tp, " (", $since, ")"),
            },
        ]
    };
}

const TRAMPOLINES: &str = "BPF trampolines (5.5+; not permitted on some kernels)";

pub const HOOKS: &[Hook] = &[
    // A second program for SYN_RECV -> ESTABLISHED, for when the kernel skips the state
    // tracepoint (see the programs' `setup` module): a cgroup program, on the traced
    // servers' sockets alone, where it loads; else a twin on the tracepoint, which runs
    // for every state change on the machine. The cgroup program takes the traced
    // connections' state changes too where the state hook's first implementation says
    // so: it comes first, so that the state hook knows.
    Hook {
        name: "socket operations",
        needed_for: "the setups the state tracepoint misses while a softirq interrupts it (counted as missed \
                     setups); the traced connections' state changes without the state tracepoint",
        required: false,
        phases: &[],
        implementations: &[
            Implementation {
                programs: &[one("socket_ops", Attach::CgroupSockOps(None))],
                needs: "cgroup v2 and socket-operation programs that see the socket and may ask for the current task \
                        (not 5.10)",
            },
            // The setups alone, where such a program may not know the current task.
            Implementation {
                programs: &[one("setups", Attach::CgroupSockOps(Some("setups")))],
                needs: "cgroup v2 and socket-operation programs that see the socket (5.10+)",
            },
            Implementation {
                programs: &[one("setup_state_change", Attach::TpBtf("inet_sock_set_state"))],
                needs: "BTF and the tracepoint inet_sock_set_state (4.16+)",
            },
            Implementation {
                programs: &[one("raw_setup_state_change", Attach::RawTp("inet_sock_set_state"))],
                needs: "the tracepoint inet_sock_set_state (4.16+)",
            },
        ],
        precondition: always,
    },
    Hook {
        name: "state changes",
        needed_for: "every phase",
        required: true,
        phases: &[],
        // The socket-operation program first: it runs for the traced connections alone,
        // the tracepoint for every state change of every socket on the machine.
        implementations: &[
            Implementation {
                programs: &[one("flag_open_sockets", Attach::TcpIter)],
                needs: "the socket-operation program above, and a TCP iterator that may set sockets' \
                        operation flags (6.12+)",
            },
            Implementation {
                programs: &[one("inet_sock_set_state", Attach::TpBtf("inet_sock_set_state"))],
                needs: "BTF and the tracepoint inet_sock_set_state (4.16+)",
            },
            Implementation {
                programs: &[one("raw_inet_sock_set_state", Attach::RawTp("inet_sock_set_state"))],
                needs: "the tracepoint inet_sock_set_state (4.16+)",
            },
        ],
        precondition: always,
    },
    Hook {
        name: "accept",
        needed_for: "every phase",
        required: true,
        phases: &[],
        // Hooks that only accepts pay for first: while a syscall tracepoint is enabled,
        // every system call of every process on the machine takes the kernel's slower
        // tracing path, so those come last.
        implementations: &[
            Implementation {
                programs: &[one("sock_graft", Attach::Lsm("sock_graft"))],
                needs: "BPF trampolines and the BPF LSM active (CONFIG_BPF_LSM, `bpf` in lsm=)",
            },
            // The return value is the accepted socket: no descriptor table walk. The
            // longer, older argument list first (see receive).
            Implementation {
                programs: &[one("inet_csk_accept_exit_flags", Attach::FExit("inet_csk_accept"))],
                needs: "BPF trampolines; inet_csk_accept(sk, flags, err, kern) (before 6.10)",
            },
            Implementation {
                programs: &[one("inet_csk_accept_exit", Attach::FExit("inet_csk_accept"))],
                needs: "BPF trampolines; inet_csk_accept(sk, arg) (6.10+)",
            },
            Implementation {
                programs: &[one("inet_csk_accept_return", Attach::KRetProbe("inet_csk_accept"))],
                needs: "kprobes (CONFIG_KPROBES)",
            },
            // Only in the traced processes' cgroups, and only for accepts that ask for the
            // peer's address (most servers do); an accept that does not is taken at the
            // connection's first read or write, and the syscall tracepoints below are
            // added from then on (`Probes::add_accept_fallback`).
            Implementation {
                programs: &[
                    one("accept_peer4", Attach::CgroupSockAddr("getpeername4")),
                    one("accept_peer6", Attach::CgroupSockAddr("getpeername6")),
                ],
                needs: "cgroup v2 and cgroup hooks on getpeername (5.8+); then the syscall tracepoints below, \
                        from the first accept that asks for no address",
            },
            Implementation {
                programs: &[
                    one("sys_exit_accept4", Attach::TracePoint("syscalls", "sys_exit_accept4")),
                    Program {
                        name: "sys_exit_accept",
                        attach: Attach::TracePoint("syscalls", "sys_exit_accept"),
                        optional: true,
                    },
                ],
                needs: "syscall tracepoints (CONFIG_FTRACE_SYSCALLS) and tracefs",
            },
        ],
        precondition: always,
    },
    Hook {
        name: "receive",
        needed_for: "recv_wait, think, bytes in, and the request boundaries send and delivery need",
        required: false,
        phases: &["recv_wait", "think", "send", "delivery", "upstream"],
        implementations: &[
            Implementation {
                programs: &[one("sock_recv_length", Attach::TpBtf("sock_recv_length"))],
                needs: "BTF and the tracepoint sock_recv_length (6.4+)",
            },
            Implementation {
                programs: &[one("raw_sock_recv_length", Attach::RawTp("sock_recv_length"))],
                needs: "the tracepoint sock_recv_length (6.4+)",
            },
            // The older, longer argument list first: the verifier rejects it where the
            // function has fewer arguments (the reverse would misread the result).
            Implementation {
                programs: &[one("tcp_recvmsg_exit_nonblock", Attach::FExit("tcp_recvmsg"))],
                needs: "BPF trampolines; tcp_recvmsg with nonblock (before 5.19)",
            },
            Implementation {
                programs: &[one("tcp_recvmsg_exit", Attach::FExit("tcp_recvmsg"))],
                needs: "BPF trampolines; tcp_recvmsg (5.19+)",
            },
            Implementation {
                programs: &[
                    one("tcp_recvmsg_entry", Attach::KProbe("tcp_recvmsg")),
                    one("tcp_recvmsg_return", Attach::KRetProbe("tcp_recvmsg")),
                ],
                needs: "kprobes (CONFIG_KPROBES)",
            },
        ],
        precondition: always,
    },
    Hook {
        name: "send",
        needed_for: "think, send, delivery, bytes out",
        required: false,
        phases: &["think", "send", "delivery", "upstream"],
        implementations: &[
            Implementation {
                programs: &[one("sock_send_length", Attach::TpBtf("sock_send_length"))],
                needs: "BTF and the tracepoint sock_send_length (6.3+)",
            },
            Implementation {
                programs: &[one("raw_sock_send_length", Attach::RawTp("sock_send_length"))],
                needs: "the tracepoint sock_send_length (6.3+)",
            },
            Implementation { programs: &[one("tcp_sendmsg_exit", Attach::FExit("tcp_sendmsg"))], needs: TRAMPOLINES },
            Implementation {
                programs: &[
                    one("tcp_sendmsg_entry", Attach::KProbe("tcp_sendmsg")),
                    one("tcp_sendmsg_return", Attach::KRetProbe("tcp_sendmsg")),
                ],
                needs: "kprobes (CONFIG_KPROBES)",
            },
        ],
        precondition: always,
    },
    Hook {
        name: "write start",
        needed_for: "think ending where the response's first write starts (else where it returns)",
        required: false,
        phases: &[],
        implementations: &[
            Implementation {
                programs: &[one("tcp_sendmsg_locked", Attach::TpBtf("tcp_sendmsg_locked"))],
                needs: "BTF and the tracepoint tcp_sendmsg_locked (after 6.12)",
            },
            Implementation {
                programs: &[one("raw_tcp_sendmsg_locked", Attach::RawTp("tcp_sendmsg_locked"))],
                needs: "the tracepoint tcp_sendmsg_locked (after 6.12)",
            },
            Implementation { programs: &[one("tcp_sendmsg_enter", Attach::FEntry("tcp_sendmsg"))], needs: TRAMPOLINES },
            Implementation {
                programs: &[one("tcp_sendmsg_start", Attach::KProbe("tcp_sendmsg"))],
                needs: "kprobes (CONFIG_KPROBES)",
            },
        ],
        precondition: always,
    },
    Hook {
        name: "segments received",
        needed_for: "recv_wait and upstream waits (data arrival), delivery (acknowledgements)",
        required: false,
        phases: &["recv_wait", "delivery", "upstream"],
        // The cgroup program first: on the traced server's segments it also follows TLS
        // records, which would otherwise take a second program run per segment.
        implementations: &[
            Implementation {
                programs: &[one("segments", Attach::CgroupSkbIngress)],
                needs: "cgroup v2 and cgroup socket-buffer programs",
            },
            Implementation {
                programs: &[one("tcp_probe", Attach::TpBtf("tcp_probe"))],
                needs: "BTF and the tracepoint tcp_probe (4.16+)",
            },
            Implementation {
                programs: &[one("raw_tcp_probe", Attach::RawTp("tcp_probe"))],
                needs: "the tracepoint tcp_probe (4.16+)",
            },
        ],
        precondition: always,
    },
    Hook {
        name: "SYN-ACK retransmits",
        needed_for: "handshake with retransmits",
        required: false,
        phases: &[],
        implementations: tracepoint_impls!("tcp_retransmit_synack", "raw_tcp_retransmit_synack", "4.15+"),
        precondition: always,
    },
    Hook {
        name: "retransmits",
        needed_for: "SYN retransmits of connects",
        required: false,
        phases: &[],
        implementations: tracepoint_impls!("tcp_retransmit_skb", "raw_tcp_retransmit_skb", "4.15+"),
        precondition: always,
    },
    Hook {
        name: "listen overflows",
        needed_for: "exact listen drops (handshake ACKs dropped on a full accept queue would count twice)",
        required: false,
        phases: &[],
        // Needs the socket argument of 5.19+ and the socket-cookie helper of BTF programs.
        implementations: &[Implementation {
            programs: &[one("kfree_skb", Attach::TpBtf("kfree_skb"))],
            needs: "BTF, the tracepoint kfree_skb with its socket (6.x) and the listen-overflow drop reason",
        }],
        precondition: |config| match config.drop_reason_listen_overflow {
            u32::MAX => Err("the kernel has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW drop reason"),
            _ => Ok(()),
        },
    },
    Hook {
        name: "resets sent",
        needed_for: "resets sent",
        required: false,
        phases: &[],
        implementations: tracepoint_impls!("tcp_send_reset", "raw_tcp_send_reset", "4.16+"),
        precondition: always,
    },
    Hook {
        name: "resets received",
        needed_for: "resets received",
        required: false,
        phases: &[],
        implementations: tracepoint_impls!("tcp_receive_reset", "raw_tcp_receive_reset", "4.16+"),
        precondition: always,
    },
    Hook {
        name: "process fork",
        needed_for: "children forked after start",
        required: false,
        phases: &[],
        implementations: tracepoint_impls!("sched_process_fork", "raw_sched_process_fork", "all"),
        precondition: always,
    },
    Hook {
        name: "process exit",
        needed_for: "noticing that traced processes exited",
        required: false,
        phases: &[],
        implementations: tracepoint_impls!("sched_process_exit", "raw_sched_process_exit", "all"),
        precondition: always,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implementations_are_in_preference_order() {
        for hook in HOOKS {
            let mut kinds: Vec<Kind> = hook.implementations.iter().map(Implementation::kind).collect();
            if hook.name == "accept" {
                // Ordered by what other processes pay: the LSM hook first, the syscall
                // tracepoints (a tax on every system call) last.
                assert_eq!(kinds.first(), Some(&Kind::Lsm));
                assert_eq!(kinds.last(), Some(&Kind::TracePoint));
                kinds = kinds[1..kinds.len() - 1].to_vec();
            }
            if hook.name == "segments received" {
                // The cgroup program first: it follows TLS records in the same run.
                assert_eq!(kinds.first(), Some(&Kind::CgroupSkb));
                kinds.remove(0);
            }
            if hook.name == "socket operations" {
                // The cgroup programs first: they run for the traced servers' sockets alone.
                assert_eq!(kinds[..2], [Kind::CgroupSockOps, Kind::CgroupSockOps]);
                kinds.drain(..2);
            }
            if hook.name == "state changes" {
                // The socket-operation program's calls first: for the traced sockets alone.
                assert_eq!(kinds.first(), Some(&Kind::Iter));
                kinds.remove(0);
            }
            assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "{}: {kinds:?}", hook.name);
            for i in hook.implementations {
                assert!(i.programs.iter().all(|p| p.attach.kind() == i.kind()), "{}: {i}", hook.name);
                assert!(!i.programs[0].optional, "{}: {i}", hook.name);
            }
        }
    }

    #[test]
    fn program_names_are_unique() {
        let mut names: Vec<&str> =
            HOOKS.iter().flat_map(|h| h.implementations).flat_map(|i| i.programs).map(|p| p.name).collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all);
    }

    #[test]
    fn kinds_parse_with_their_aliases() {
        assert_eq!("fexit".parse::<Kind>(), Ok(Kind::FEntry));
        assert_eq!("kretprobe".parse::<Kind>(), Ok(Kind::KProbe));
        assert_eq!("tp_btf".parse::<Kind>(), Ok(Kind::TpBtf));
        assert_eq!("uprobe".parse::<Kind>(), Ok(Kind::UProbe));
        assert!("usdt".parse::<Kind>().unwrap_err().contains("one of: tp_btf, raw_tp"));
    }
}
