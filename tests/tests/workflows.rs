//! The workflows users come for: budget checks in CI, tracing a command from its start,
//! and the slow-request timeline.

use std::{
    io::BufRead as _,
    net::SocketAddr,
    process::{Command, Stdio},
};

use serde_json::Value;
use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

fn client_opts(server: SocketAddr, connections: usize, requests: usize) -> ClientOptions {
    ClientOptions { connections, requests, ..ClientOptions::to(server) }
}

/// Traces a slow-think (100 ms) server through 12 requests with `checks`: the exit code
/// and the final report's verdicts.
fn checked(checks: &[&str]) -> anyhow::Result<(i32, Vec<Value>)> {
    let (server, addr) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "100"])?;
    let mut args = vec!["--pid".to_owned(), server.pid().to_string()];
    for c in checks {
        args.extend(["--check".to_owned(), c.to_string()]);
    }
    let tracer = start_tracer(&args)?;
    client::run(&client_opts(addr, 1, 12))?;
    let (code, lines) = tracer.stop_with_code()?;
    let verdicts = final_report(&lines)?["checks"].as_array().cloned().unwrap_or_default();
    Ok((code, verdicts))
}

#[test]
fn a_failing_check_exits_1_and_names_its_value() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (code, verdicts) = checked(&["think.p99<50ms", "lost_events==0"])?;
    assert_eq!(code, 1, "{verdicts:?}");
    assert_eq!(verdicts.len(), 2);
    let think = &verdicts[0];
    assert_eq!(think["check"], "think.p99<50ms");
    assert_eq!(think["passed"], false);
    let value_ms = think["value"].as_f64().unwrap_or(0.0) / 1e6;
    assert_near("measured think p99", value_ms, 100.0, 5.0, 2.0);
    assert!(think["message"].as_str().unwrap_or("").starts_with("measured 10"), "{think}");
    assert_eq!(verdicts[1]["passed"], true);
    Ok(())
}

#[test]
fn passing_checks_exit_0() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (code, verdicts) = checked(&["think.p99<500ms", "requests>=12", "delivery.max<100ms"])?;
    assert_eq!(code, 0, "{verdicts:?}");
    assert!(verdicts.iter().all(|v| v["passed"] == true), "{verdicts:?}");
    Ok(())
}

/// Too few samples fail the check rather than pass it: an idle listener, and a busy
/// one under a higher --min-samples.
#[test]
fn min_samples_makes_idle_checks_fail() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (idle, _) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--pid".into(), idle.pid().to_string(), "--check".into(), "think.p99<1s".into()])?;
    let (code, lines) = tracer.stop_with_code()?;
    let verdict = &final_report(&lines)?["checks"][0];
    assert_eq!(code, 1, "{verdict}");
    assert!(verdict["message"].as_str().unwrap_or("").contains("only 0 samples"), "{verdict}");

    let (busy, addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&[
        "--pid".into(),
        busy.pid().to_string(),
        "--min-samples".into(),
        "5".into(),
        "--check".into(),
        "think.p99<1s".into(),
        "--check".into(),
        "think[:".to_owned() + &addr.port().to_string() + "].max<1s",
    ])?;
    client::run(&client_opts(addr, 1, 3))?;
    let (code, lines) = tracer.stop_with_code()?;
    let checks = &final_report(&lines)?["checks"];
    assert_eq!(code, 1, "{checks}");
    assert!(checks[0]["message"].as_str().unwrap_or("").contains("only 3 samples"), "{checks}");
    Ok(())
}

/// Scheduling policy of a process's main thread (`SCHED_OTHER` 0, `SCHED_BATCH` 3).
fn sched_policy(pid: u32) -> anyhow::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends at the last ')': state is field 3,
    // policy field 41.
    let after_name = &stat[stat.rfind(')').unwrap_or(0) + 1..];
    Ok(after_name.split_whitespace().nth(41 - 3).unwrap_or("").parse()?)
}

/// `tracer -- lab server`: traced from its first instruction (the very first
/// connection's handshake and accept_wait are there), and the tracer exits with the
/// command's status. The tracer runs as a batch task, so that its wake-ups never
/// preempt the server; the command keeps the normal policy.
#[test]
fn a_command_is_traced_from_its_start() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = lab_bin().display().to_string();
    let (mut tracer, mut stdout) = trace_command(&[&lab, "server", "--max-connections", "1"])?;
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let addr: SocketAddr = line.trim().strip_prefix("listening on ").expect("lab server output").parse()?;
    let tracer_pid = tracer.child.id();
    let children = std::fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children"))?;
    let server_pid: u32 = children.split_whitespace().next().expect("the command is the tracer's child").parse()?;
    assert_eq!(sched_policy(tracer_pid)?, libc::SCHED_BATCH as u32, "the tracer's policy");
    assert_eq!(sched_policy(server_pid)?, libc::SCHED_OTHER as u32, "the traced command's policy");
    // At once: the server is seconds old at most.
    client::run(&client_opts(addr, 1, 3))?;
    let status = tracer.child.wait()?;
    assert_eq!(status.code(), Some(0));
    let lines = json_lines(stdout)?;
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], 1, "{l}");
    assert_eq!(phase_count(l, "handshake"), 1, "{l}");
    assert_eq!(phase_count(l, "accept_wait"), 1, "{l}");
    assert_eq!(l["requests"], 3, "{l}");

    // A failing command's status is the tracer's.
    let status = Command::new(tracer_bin()).args(["--", "sh", "-c", "exit 7"]).stdout(Stdio::null()).status()?;
    assert_eq!(status.code(), Some(7));
    // With --duration the tracer stops the command, which is not a failure.
    let status =
        Command::new(tracer_bin()).args(["--duration", "1s", "--", "sleep", "30"]).stdout(Stdio::null()).status()?;
    assert_eq!(status.code(), Some(0));
    Ok(())
}

fn slow_lines(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|v| v["type"] == "slow").collect()
}

/// --slow in body-stall: the stalled requests' largest phase is `send`.
#[test]
fn slow_request_timeline_marks_send_in_body_stall() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "body-stall", "--delay-ms", "100"])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--slow".into(), "50ms".into()])?;
    client::run(&client_opts(addr, 1, 4))?;
    let lines = tracer.stop()?;
    let slow = slow_lines(&lines);
    assert_eq!(slow.len(), 4, "{slow:?}");
    for s in slow {
        assert_eq!(s["what"], "request", "{s}");
        assert_eq!(s["largest"], "send", "{s}");
        assert_eq!(s["listener"], addr.port(), "{s}");
        let send_ms = s["phases"]["send"].as_u64().unwrap_or(0) as f64 / 1e6;
        assert_near("send", send_ms, 100.0, 5.0, 2.0);
        assert!(s["total_ns"].as_u64().unwrap_or(0) >= s["phases"]["send"].as_u64().unwrap_or(u64::MAX), "{s}");
    }
    Ok(())
}

/// --slow in slow-accept: connection setups are slow, and accept_wait is why. (The
/// first connection finds the server already waiting in accept(): it is not slow.)
#[test]
fn slow_request_timeline_marks_accept_wait_in_slow_accept() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (server, addr) = start_lab_server(&["--scenario", "slow-accept", "--delay-ms", "100"])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--slow".into(), "50ms".into()])?;
    client::run(&client_opts(addr, 4, 1))?;
    let lines = tracer.stop()?;
    let slow: Vec<_> = slow_lines(&lines).into_iter().filter(|s| s["what"] == "connection").collect();
    assert!(slow.len() >= 3, "{slow:?}");
    for s in slow {
        assert_eq!(s["largest"], "accept_wait", "{s}");
    }
    Ok(())
}
