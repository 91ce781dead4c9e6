//! The command-line surface: help, bad flags and exit codes. None of these needs root:
//! every case is refused before any kernel program is loaded.

use assert_cmd::Command;
use predicates::prelude::*;

fn tracer() -> Command {
    Command::cargo_bin("tracer").expect("tracer binary")
}

#[test]
fn help_documents_the_workflows() {
    tracer()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("--check <EXPR>"))
        .stdout(predicate::str::contains("--slow <DURATION>"))
        .stdout(predicate::str::contains("--min-samples"))
        .stdout(predicate::str::contains("[COMMAND]..."))
        .stdout(predicate::str::contains("Exit status: 0 all checks hold, 1 a check failed"));
    tracer().arg("--version").assert().success().stdout(predicate::str::starts_with("tracer "));
}

#[test]
fn unknown_flags_are_usage_errors() {
    tracer().arg("--bogus").assert().code(2).stderr(predicate::str::contains("unexpected argument '--bogus'"));
    tracer()
        .args(["--duration", "fast", "--pid", "1"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not a duration"));
    tracer().args(["--output", "xml", "--pid", "1"]).assert().code(2).stderr(predicate::str::contains("xml"));
}

#[test]
fn malformed_checks_point_at_the_error() {
    for (check, says) in [
        ("think.p99<fast", "not a duration"),
        ("thunk.p99<5ms", "unknown phase 'thunk'"),
        ("think.p98<5ms", "unknown statistic 'p98'"),
        ("think.p99", "no comparison"),
        ("drops==0", "unknown counter 'drops'"),
    ] {
        tracer()
            .args(["--pid", "1", "--check", check])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(says))
            .stderr(predicate::str::contains(check));
    }
}

#[test]
fn bad_targets_are_set_up_errors() {
    tracer().assert().code(2).stderr(predicate::str::contains("nothing to trace"));
    tracer().args(["--pid", "1", "--port", "80"]).assert().code(2).stderr(predicate::str::contains("alternatives"));
    tracer()
        .args(["--port", "0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no socket ever listens on port 0"));
    tracer().args(["--pid", "1", "--route", "products"]).assert().code(2).stderr(predicate::str::contains("--route"));
    tracer()
        .args(["--pid", "1", "--max-labels", "0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--max-labels"));
    tracer().args(["--pid", "1", "--", "true"]).assert().code(2).stderr(predicate::str::contains("leave out --pid"));
    tracer()
        .args(["--pid", "4000000000"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no process with PID 4000000000"));
    tracer().args(["--pid", "2"]).assert().code(2).stderr(predicate::str::contains("kernel thread"));
    tracer()
        .args(["--pid", "1", "--ring-buffer-size", "1000"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("power of two"));
    tracer().args(["--pid", "1", "--interval", "0s"]).assert().code(2).stderr(predicate::str::contains("--interval"));
}
