//! How results reach the user: periodic reports, the live status line, the 80-column
//! text report.

use std::process::{Command, Stdio};

use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

fn client_opts(server: std::net::SocketAddr, requests: usize) -> ClientOptions {
    ClientOptions { requests, ..ClientOptions::to(server) }
}

/// `--interval 1s --duration 3500ms`: three interval reports, then the final one, each
/// cumulative.
#[test]
fn interval_reports_are_cumulative() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&[])?;
    let mut tracer = start_tracer(&[
        "--pid".into(),
        server.pid().to_string(),
        "--interval".into(),
        "1s".into(),
        "--duration".into(),
        "3500ms".into(),
    ])?;
    for _ in 0..3 {
        client::run(&client_opts(addr, 5))?;
        std::thread::sleep(std::time::Duration::from_millis(1000));
    }
    let lines = tracer.wait()?;
    let reports: Vec<_> = lines.iter().filter(|v| v["type"] == "report").collect();
    let kinds: Vec<_> = reports.iter().map(|r| r["kind"].as_str().unwrap_or("?")).collect();
    assert_eq!(kinds, ["interval", "interval", "interval", "final"], "{reports:?}");
    let requests: Vec<u64> = reports
        .iter()
        .map(|r| listener(r, addr.port()).map(|l| l["requests"].as_u64().unwrap_or(0)).unwrap_or(0))
        .collect();
    assert!(requests.windows(2).all(|w| w[0] <= w[1]), "not cumulative: {requests:?}");
    assert_eq!(*requests.last().unwrap(), 15, "{requests:?}");
    assert!(requests[0] >= 5 && requests[0] < 15, "{requests:?}");
    Ok(())
}

/// The status line appears on a terminal (here a pseudo-terminal from `script`), never
/// in a pipe; the text report fits 80 columns.
#[test]
fn status_line_only_on_a_terminal_and_report_fits_80_columns() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "20"])?;
    let traffic = std::thread::spawn(move || client::run(&client_opts(addr, 40)));
    let tracer = tracer_bin().display().to_string();
    let command = format!("{tracer} --pid {} --duration 2s", server.pid());
    // On a terminal: `script` gives the tracer a pseudo-terminal for stdout and stderr.
    let tty = Command::new("script").args(["-qefc", &command, "/dev/null"]).stdin(Stdio::null()).output()?;
    assert!(tty.status.success(), "{tty:?}");
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    assert!(tty_out.contains("\rtracing "), "no status line on a terminal: {tty_out:?}");
    assert!(tty_out.contains(" requests, "), "{tty_out:?}");
    // In pipes: no status line, and the report fits 80 columns.
    let piped = Command::new(tracer_bin())
        .args(["--pid", &server.pid().to_string(), "--duration", "2s"])
        .stdin(Stdio::null())
        .output()?;
    traffic.join().expect("client thread")?;
    assert!(piped.status.success(), "{piped:?}");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(!stderr.contains('\r'), "status line in a pipe: {stderr:?}");
    let report = String::from_utf8_lossy(&piped.stdout);
    assert!(report.contains(&format!("listener :{}", addr.port())), "{report}");
    assert!(report.contains("think"), "{report}");
    for line in report.lines() {
        assert!(line.chars().count() <= 80, "line wider than 80 columns: {line:?}");
    }
    Ok(())
}
