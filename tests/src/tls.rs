//! TLS for the tests: a self-signed certificate made with Debian's `openssl` command,
//! and curl's own timings of HTTPS requests.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

/// A self-signed certificate for `localhost` and 127.0.0.1, and its key, in a directory
/// of their own (removed on drop).
pub struct TestCert {
    dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCert {
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tracer-cert-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .output()
            .context("running openssl (cargo xtask setup installs it)")?;
        if !out.status.success() {
            bail!("openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { dir, cert, key })
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What curl measured of one transfer.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub status: u16,
    /// TCP connect done, and TLS established, in seconds from the transfer's start
    /// (`time_appconnect` is 0 on a reused connection).
    pub connect_s: f64,
    pub appconnect_s: f64,
}

impl Transfer {
    /// The TLS handshake as the client saw it, if this transfer made one.
    pub fn handshake_ms(&self) -> Option<f64> {
        (self.appconnect_s > 0.0).then(|| (self.appconnect_s - self.connect_s) * 1e3)
    }
}

/// Fetches every URL of `urls` with one curl process over HTTP/1.1 (insecure: the
/// tests' own certificate), reusing its connection unless `new_connections`; curl's
/// timing of each transfer.
pub fn curl(urls: &[String], new_connections: bool, tls_version: &str) -> Result<Vec<Transfer>> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-k", "--http1.1", tls_version, "--tls-max", &tls_version["--tlsv".len()..]]);
    if new_connections {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.args(["-w", "%{http_code} %{time_connect} %{time_appconnect}\\n"]);
    for url in urls {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = cmd.stderr(Stdio::inherit()).output().context("running curl")?;
    if !out.status.success() {
        bail!("curl failed: {}", out.status);
    }
    let text = String::from_utf8(out.stdout)?;
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [status, connect, appconnect] = f[..] else { bail!("curl printed {l:?}") };
            Ok(Transfer { status: status.parse()?, connect_s: connect.parse()?, appconnect_s: appconnect.parse()? })
        })
        .collect()
}
