//! A real server: nginx from Debian's packages, two workers, traced by its master's PID.
//! Every request is counted under the right listener with the bytes the client saw.

use std::{
    fs,
    net::TcpListener,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

#[test]
fn nginx_requests_and_bytes_match_the_client() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("tracer-nginx-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("www"))?;
    fs::write(dir.join("www/index.html"), "x".repeat(4321))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{ access_log off; server {{ listen 127.0.0.1:{port}; root {d}/www; }} }}\n",
            d = dir.display()
        ),
    )?;
    let nginx = Proc {
        child: Command::new("nginx")
            .args(["-p", dir.to_str().unwrap(), "-c", dir.join("nginx.conf").to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()?,
    };
    let addr = format!("127.0.0.1:{port}").parse()?;
    // Wait until nginx listens.
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(200)); // the workers fork after the listener opens

    let tracer = start_tracer(&["--pid".into(), nginx.pid().to_string()])?;
    let results = client::run(&ClientOptions {
        server: addr,
        connections: 8,
        requests: 25,
        size: 0,
        parallel: true,
        read_delay_ms: 0,
        rcvbuf: 0,
        pause_after_connect_ms: 0,
    })?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let l = listener(report, port)?;
    let sent: u64 = results.iter().map(|r| r.bytes_sent).sum();
    let received: u64 = results.iter().map(|r| r.bytes_received).sum();
    assert_eq!(l["connections"], 8, "{l}");
    assert_eq!(l["requests"], 200, "{l}");
    assert_eq!(l["bytes_in"], sent, "{l}");
    assert_eq!(l["bytes_out"], received, "{l}");
    assert_eq!(phase_count(l, "think"), 200, "{l}");
    assert_eq!(report["listeners"].as_array().unwrap().len(), 1, "{report}");
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}
