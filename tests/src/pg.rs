//! PostgreSQL clusters the tests create (Debian's server binaries, run as the `postgres`
//! user), each on a free port in a directory of its own; stopped and removed on drop.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// The newest installed server's bin directory.
fn server_bin() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server not installed (run `cargo xtask setup`)")?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context("no PostgreSQL server under /usr/lib/postgresql")
}

fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(program);
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    /// The transactions pgbench says it processed ("number of transactions actually
    /// processed: 2000/2000") in its standard output.
    pub fn pgbench_transactions(output: &str) -> Result<u64> {
        output
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next()?.trim().parse().ok())
            .with_context(|| format!("no transaction count in pgbench's output:\n{output}"))
    }

    /// pgbench against the cluster; its standard output. Without SSL or GSS negotiation,
    /// so that a connection's start-up is one exchange: StartupMessage, answered by
    /// AuthenticationOk … ReadyForQuery.
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.program("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .env("PGSSLMODE", "disable")
            .env("PGGSSENCMODE", "disable")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pgbench {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A new cluster with table `items (k int, v text)` of `rows` rows; with an index on
    /// `k` when `indexed`.
    pub fn start(rows: u32, indexed: bool) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = server_bin()?;
        let dir = std::env::temp_dir().join(format!(
            "tracer-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let user = CString::new("postgres")?;
        let pw = unsafe { libc::getpwnam(user.as_ptr()) };
        anyhow::ensure!(!pw.is_null(), "no postgres user (install Debian's postgresql)");
        let path = CString::new(dir.as_os_str().as_encoded_bytes())?;
        anyhow::ensure!(
            unsafe { libc::chown(path.as_ptr(), (*pw).pw_uid, (*pw).pw_gid) } == 0,
            "chown {}",
            dir.display()
        );
        let data = dir.join("data");
        run(as_postgres(&bin.join("initdb")).args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data))?;
        let port = free_port()?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_parallel_workers_per_gather=0",
            dir.display()
        );
        run(as_postgres(&bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-o", &options, "start"]))?;
        let cluster = Self { port, dir, bin };
        let mut client = postgres::Client::connect(&cluster.url(), postgres::NoTls)?;
        client.batch_execute(&format!(
            "CREATE TABLE items (k int NOT NULL, v text NOT NULL);
             INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, {rows}) g;
             {}
             ANALYZE items;",
            if indexed { "CREATE INDEX items_k ON items (k);" } else { "" }
        ))?;
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A program of the server's version (`pgbench`, `psql`, …).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// The server's log (its standard error).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The postmaster's PID, from the first line of `postmaster.pid`: it accepts every
    /// connection and forks a backend for it.
    pub fn postmaster_pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))?;
        text.lines().next().and_then(|l| l.trim().parse().ok()).context("no PID in postmaster.pid")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = run(as_postgres(&self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop"));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
