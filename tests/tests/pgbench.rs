//! PostgreSQL with its own load generator, pgbench: four clients, traced on the
//! postmaster (which forks a backend per connection). pgbench ends every connection
//! with a Terminate message and a FIN: a message the server does not answer, so a close
//! by the peer, not an aborted request. The truth is pgbench's own count of
//! transactions and the server's log of every connection and statement.

use tracer_tests::{harness::*, pg::Cluster};

const CLIENTS: usize = 4;
const TRANSACTIONS: usize = 500;

#[test]
fn pgbench_clean_closes_and_counts() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cluster = Cluster::start(0, false)?;
    // The server logs every connection and statement from now on (for new backends).
    let mut admin = postgres::Client::connect(&cluster.url(), postgres::NoTls)?;
    admin.batch_execute("ALTER SYSTEM SET log_connections = on")?;
    admin.batch_execute("ALTER SYSTEM SET log_statement = 'all'")?;
    admin.batch_execute("SELECT pg_reload_conf()")?;
    drop(admin);
    let mut reloaded = false;
    for _ in 0..100 {
        let mut c = postgres::Client::connect(&cluster.url(), postgres::NoTls)?;
        if c.query_one("SHOW log_statement", &[])?.get::<_, String>(0) == "all" {
            reloaded = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(reloaded, "the server did not take log_statement = all");
    cluster.pgbench(&["-i", "-q", "-s", "1"])?;
    let log_start = std::fs::metadata(cluster.log_path())?.len() as usize;

    let tracer = start_tracer(&["--pid".into(), cluster.postmaster_pid()?.to_string()])?;
    // Select-only: each transaction is one statement, one request and its response.
    // No vacuum first (-n): pgbench's own first connection only reads the scale.
    let output =
        &cluster.pgbench(&["-n", "-S", "-c", &CLIENTS.to_string(), "-j", "2", "-t", &TRANSACTIONS.to_string()])?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;

    // pgbench's word.
    let processed = Cluster::pgbench_transactions(output)?;
    // The server's word: its log since tracing started.
    let log = std::fs::read(cluster.log_path())?;
    let log = String::from_utf8_lossy(&log[log_start..]);
    let connections = log.lines().filter(|l| l.contains("connection authorized")).count() as u64;
    let statements = log.lines().filter(|l| l.contains("LOG:  statement: ")).count() as u64;
    let l = listener(report, cluster.port)?;
    eprintln!(
        "{}pgbench: {processed} transactions; server log: {connections} connections, {statements} statements",
        describe(report)
    );

    // The truth side: every transaction ran; every client connected; the log agrees.
    assert_eq!(processed, (CLIENTS * TRANSACTIONS) as u64, "{output}");
    assert!(connections >= CLIENTS as u64, "pgbench's clients (and its first connection): {log}");
    // Beyond the transactions, pgbench's few set-up queries on its first connection.
    assert!((processed..processed + 10).contains(&statements), "{statements} statements in the log");

    let mut v = Verdicts::default();
    v.eq("lost events", &report["lost_events"], &serde_json::json!(0));
    v.extend(other_listeners(report, &[cluster.port]));
    v.eq("connections", l["connections"].as_u64(), Some(connections));
    v.eq("aborted", l["aborted"].as_u64(), Some(0));
    v.eq("closed by the peer (a Terminate per connection)", l["closed_by_peer"].as_u64(), Some(connections));
    // Timed requests: pgbench's transactions, one start-up exchange per connection, and
    // the set-up statements of pgbench's first connection (the log's statements beyond
    // the transactions). So the timed requests exceed the transactions by the
    // connections' start-up exchanges plus those few statements — exactly.
    let setup = statements - processed;
    v.eq("timed requests", phase_count(l, "think"), processed + connections + setup);
    v.extend(counts_not_adding_up(report));
    v.finish();
    Ok(())
}
