//! `--all`: every process on the host that accepts TCP connections, each listener
//! reported with its process. Three lab servers and an idle process run; each server's
//! listener must be reported with its exact request count and its own process, and the
//! idle process nowhere.

use std::process::Command;

use anyhow::Result;
use tracer_tests::harness::*;

#[test]
fn every_server_is_traced_with_its_process() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let servers = [start_lab_server(&[])?, start_lab_server(&[])?, start_lab_server(&[])?];
    let idle = Proc { child: Command::new("sleep").arg("600").spawn()? };
    let tracer = start_tracer(&["--all".into()])?;
    for (i, (_, addr)) in servers.iter().enumerate() {
        run_lab_client(None, &["--server", &addr.to_string(), "--requests", &(3 + i).to_string()])?;
    }
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    eprintln!("{}", describe(report));
    let mut v = Verdicts::default();
    for (i, (server, addr)) in servers.iter().enumerate() {
        let l = listener(report, addr.port())?;
        v.eq(&format!("requests on :{}", addr.port()), l["requests"].as_u64(), Some(3 + i as u64));
        let processes: Vec<(u64, String)> = l["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| (p["pid"].as_u64().unwrap_or(0), p["command"].as_str().unwrap_or("").to_owned()))
            .collect();
        v.eq(&format!("processes of :{}", addr.port()), processes, vec![(server.pid() as u64, "lab".to_owned())]);
    }
    let idle_seen = report["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["processes"].as_array().cloned().unwrap_or_default())
        .any(|p| p["pid"].as_u64() == Some(idle.pid() as u64));
    v.check(!idle_seen, || format!("the idle process {} is reported", idle.pid()));
    v.finish();
    Ok(())
}
