//! The lab: a server that reproduces backend pathologies on demand, a client to drive
//! it, and helpers the privileged integration tests share (starting the tracer,
//! reading its JSON report).
//!
//! Protocol: a request is `GET /?size=N&delay=MS HTTP/1.1` headers ending in a blank
//! line; the response carries exactly N body bytes (`Content-Length: N`), after a sleep
//! of MS milliseconds when `delay` is given. Connections are kept alive unless the
//! request says `Connection: close`.
//!
//! The `shop` scenario routes by path instead (`size` is ignored, `delay` still
//! applies): `GET /products` answers the whole product list (over a megabyte),
//! `GET /productTypes` a short list, `GET /products/{n}` one product, anything else
//! `404 Not Found`. `lab client --path P` (repeated) requests those paths in order on
//! each connection and reports each response's status and bytes.

pub mod backends;
pub mod cgroup;
pub mod client;
pub mod handoff;
pub mod harness;
pub mod hold;
pub mod load;
pub mod netns;
pub mod nginx;
pub mod pg;
pub mod redis;
pub mod server;
pub mod tls;
// Not in the musl build of the binaries (see Cargo.toml).
#[cfg(not(target_env = "musl"))]
pub mod tls_client;
