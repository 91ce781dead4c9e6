//! TLS libraries and processes that appear after tracing started: a Python HTTPS server
//! that loads OpenSSL (its `ssl` module) only after the tracer attached, and an nginx
//! worker that the master forks again after the first one was killed. Both must be
//! followed through the library, without a restart of the tracer.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::Duration,
};

use tracer_tests::{
    harness::*,
    nginx::Nginx,
    tls::{curl, TestCert},
};

const REQUESTS: usize = 10;

/// A Python HTTPS server (Python's `ssl` uses the host's OpenSSL) that imports `ssl`
/// (and `http.server`, which imports it) only once it reads a line on stdin, after the
/// tracer attached.
const SERVER: &str = r#"
import sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
print("started", flush=True)
sys.stdin.readline()
import http.server, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("listening", flush=True)
server.serve_forever()
"#;

#[test]
fn a_library_loaded_after_tracing_started_is_hooked() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cert = TestCert::new()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new("python3")
        .args(["-c", SERVER, &port.to_string()])
        .arg(&cert.cert)
        .arg(&cert.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let server = Proc { child };
    let mut line = String::new();
    out.read_line(&mut line)?;
    assert_eq!(line.trim(), "started");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid()))?;
    assert!(!maps.contains("libssl"), "python mapped OpenSSL before it imported ssl");

    let tracer = start_tracer(&["--pid".into(), server.pid().to_string()])?;
    // Now the server loads OpenSSL and listens; the tracer finds the library on its own.
    std::io::Write::write_all(&mut stdin, b"go\n")?;
    line.clear();
    out.read_line(&mut line)?;
    assert_eq!(line.trim(), "listening");
    tracer.wait_for_line("tracer: TLS: OpenSSL uprobes on", Duration::from_secs(10))?;
    served_through_openssl(tracer, SocketAddr::from(([127, 0, 0, 1], port)))
}

#[test]
fn a_worker_forked_after_tracing_started_is_hooked() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cert = TestCert::new()?;
    let nginx =
        Nginx::start_with(1, "", "ssl_protocols TLSv1.3;\nlocation / { return 200 \"hello\"; }\n", Some(&cert))?;
    // `-v`: the tracer then says which processes it hooked.
    let tracer = start_tracer(&["--pid".into(), nginx.pid().to_string(), "-v".into()])?;
    let old = nginx.workers();
    assert_eq!(old.len(), 1);
    // The master replaces a killed worker with a new process.
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };
    let new = loop {
        let now = nginx.workers();
        if now.len() == 1 && now[0] != old[0] {
            break now[0];
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Hooked once the tracer has seen the new process (it scans every second).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{new}/maps"))?.contains("libssl") {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the new worker never mapped libssl");
        std::thread::sleep(Duration::from_millis(20));
    }
    tracer.wait_for_line(&format!("[INFO ] TLS: hooked process {new} "), Duration::from_secs(10))?;
    served_through_openssl(tracer, nginx.addr)
}

/// `REQUESTS` HTTPS requests on new connections to `addr`, then the tracer's verdict:
/// each counted once, none aborted, each connection's handshake timed, all through
/// OpenSSL's calls.
fn served_through_openssl(tracer: Tracer, addr: SocketAddr) -> anyhow::Result<()> {
    let transfers = curl(&vec![format!("https://{addr}/"); REQUESTS], true, "--tlsv1.3")?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    eprintln!("{}", describe(report));
    assert!(transfers.iter().all(|t| t.status == 200), "{transfers:?}");

    let mut v = Verdicts::default();
    v.eq("requests", l["requests"].as_u64(), Some(REQUESTS as u64));
    v.eq("aborted", l["aborted"].as_u64(), Some(0));
    v.eq("tls samples", phase_count(l, "tls"), REQUESTS as u64);
    v.eq("how TLS is followed", l["tls"]["method"].as_str(), Some("OpenSSL uprobes"));
    v.extend(counts_not_adding_up(report));
    v.finish();
    Ok(())
}
