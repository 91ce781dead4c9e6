//! nginx from Debian's packages, run by the tests in a prefix directory of its own:
//! a master and its workers, one `server` on a free local port.

use std::{
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

use anyhow::{bail, Result};

use crate::{harness::Proc, tls::TestCert};

pub struct Nginx {
    /// Always `Some` until dropped.
    proc: Option<Proc>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { return false };
            // The parent is the second field after the command, which is in parentheses.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

impl Nginx {
    /// Starts nginx with `workers` worker processes; `http` goes inside the `http`
    /// block, `server` inside its one `server` block (which already listens). Returns
    /// once the workers run. Files the configuration names relative to the prefix (an
    /// access log, say) are found with [`Nginx::path`].
    pub fn start(workers: usize, http: &str, server: &str) -> Result<Self> {
        Self::start_with(workers, http, server, None)
    }

    /// [`Nginx::start`], serving HTTPS with `cert` when given (the `server` block then
    /// chooses the protocol versions, e.g. `ssl_protocols TLSv1.3;`).
    pub fn start_with(workers: usize, http: &str, server: &str, cert: Option<&TestCert>) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tracer-nginx-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("www"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.display();
        let tls = match cert {
            Some(c) => {
                format!(" ssl;\nssl_certificate {};\nssl_certificate_key {};", c.cert.display(), c.key.display())
            }
            None => ";".into(),
        };
        fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n{http}\nserver {{\nlisten 127.0.0.1:{port}{tls}\nroot {d}/www;\n{server}\n}}\n}}\n"
            ),
        )?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .spawn()?;
        let nginx = Self { proc: Some(Proc { child }), addr: SocketAddr::from(([127, 0, 0, 1], port)), dir };
        for _ in 0..200 {
            if children(nginx.pid()).len() == workers && TcpStream::connect(nginx.addr).is_ok() {
                return Ok(nginx);
            }
            thread::sleep(Duration::from_millis(25));
        }
        bail!("nginx did not start {workers} workers listening on {}: {}", nginx.addr, nginx.error_log())
    }

    /// The master's PID: tracing it follows the workers.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").pid()
    }

    /// The worker processes now.
    pub fn workers(&self) -> Vec<u32> {
        children(self.pid())
    }

    /// A file under the prefix directory.
    pub fn path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.join(name)
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.path("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master stops its workers on SIGTERM (Proc's drop); then the files go.
        drop(self.proc.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}
