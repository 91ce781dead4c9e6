//! `--cgroup`: the processes of a cgroup, chosen in the kernel by cgroup id. Lab servers
//! in cgroups the test creates, and one outside them: the tracer must report exactly
//! the listeners of the cgroups it was given, with their exact request counts; a server
//! moved into the cgroup after the tracer started is traced from its next connection;
//! a server in its own PID and network namespace (as a container's) is traced by its
//! cgroup, with the addresses its client saw.

use anyhow::Result;
use serde_json::Value;
use tracer_tests::{cgroup::TestCgroup, harness::*, netns::Netns};

fn listeners(report: &Value) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = report["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| (l["port"].as_u64().unwrap_or(0), l["requests"].as_u64().unwrap_or(0)))
        .collect();
    out.sort();
    out
}

fn requests(addr: &std::net::SocketAddr, n: usize) -> Result<()> {
    run_lab_client(None, &["--server", &addr.to_string(), "--requests", &n.to_string()])?;
    Ok(())
}

#[test]
fn only_the_given_cgroups_are_traced() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (a, b) = (TestCgroup::new()?, TestCgroup::new()?);
    let (in_a, addr_a) = start_lab_server(&[])?;
    let (in_b, addr_b) = start_lab_server(&[])?;
    let (_outside, addr_out) = start_lab_server(&[])?;
    a.add(in_a.pid())?;
    b.add(in_b.pid())?;

    let tracer = start_tracer(&["--cgroup".into(), a.path.clone()])?;
    requests(&addr_a, 5)?;
    requests(&addr_b, 6)?;
    requests(&addr_out, 7)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    eprintln!("{}", describe(report));
    assert_eq!(listeners(report), vec![(addr_a.port() as u64, 5)], "--cgroup {}", a.path);

    // Both cgroups, one of them by its full directory.
    let tracer =
        start_tracer(&["--cgroup".into(), a.path.clone(), "--cgroup".into(), b.dir.to_string_lossy().into_owned()])?;
    requests(&addr_a, 3)?;
    requests(&addr_b, 4)?;
    requests(&addr_out, 2)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    let mut expected = vec![(addr_a.port() as u64, 3), (addr_b.port() as u64, 4)];
    expected.sort();
    assert_eq!(listeners(report), expected);
    Ok(())
}

#[test]
fn a_server_moved_into_the_cgroup_is_traced_from_its_next_connection() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cg = TestCgroup::new()?;
    let (server, addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--cgroup".into(), cg.path.clone()])?;
    requests(&addr, 3)?;
    cg.add(server.pid())?;
    requests(&addr, 4)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    eprintln!("{}", describe(report));
    assert_eq!(listeners(report), vec![(addr.port() as u64, 4)]);
    Ok(())
}

#[test]
fn a_server_in_its_own_pid_and_network_namespace_is_traced_by_its_cgroup() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cg = TestCgroup::new()?;
    let netns = Netns::new()?;
    // A container's server: its own network namespace, its own PID namespace (it is
    // PID 1 there, `unshare` its parent outside), started inside the cgroup.
    let mut cmd = netns.command("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"]).arg(lab_bin()).arg("server");
    cg.start_inside(&mut cmd);
    let (_server, addr) = start_listening(cmd)?;
    let tracer = start_tracer(&["--cgroup".into(), cg.path.clone(), "--connections".into()])?;
    let clients =
        run_lab_client(Some(&netns), &["--server", &addr.to_string(), "--connections", "2", "--requests", "5"])?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    eprintln!("{}", describe(report));
    assert_eq!(listeners(report), vec![(addr.port() as u64, 10)]);
    // The addresses the programs read are the namespace's own: each client connection,
    // by its port, with the server's address and the bytes the client counted.
    let connections: Vec<&Value> = lines.iter().filter(|l| l["type"] == "connection").collect();
    assert_eq!(connections.len(), 2, "{connections:?}");
    for client in &clients {
        let remote = format!("127.0.0.1:{}", client["port"]);
        let c = connections.iter().find(|c| c["remote"] == remote.as_str());
        let c = c.unwrap_or_else(|| panic!("no connection from {remote}: {connections:?}"));
        assert_eq!(c["local"], addr.to_string().as_str(), "{c}");
        assert_eq!(c["bytes_in"].as_f64(), Some(client["sent"]), "{c}");
        assert_eq!(c["bytes_out"].as_f64(), Some(client["received"]), "{c}");
    }
    Ok(())
}

#[test]
fn a_container_is_found_by_its_id() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // A Docker container's cgroup as the systemd driver names it, under a parent of the
    // test's own (no container runtime runs here).
    let id = format!("{:016x}{}", std::process::id(), "0123456789abcdef".repeat(3));
    let parent = TestCgroup::new()?;
    let scope = parent.child(&format!("docker-{id}.scope"))?;
    let (server, addr) = start_lab_server(&[])?;
    let (_outside, other) = start_lab_server(&[])?;
    scope.add(server.pid())?;
    let tracer = start_tracer(&["--container".into(), id[..12].to_owned()])?;
    requests(&addr, 6)?;
    requests(&other, 2)?;
    let lines = tracer.stop()?;
    let report = final_report(&lines)?;
    assert_eq!(listeners(report), vec![(addr.port() as u64, 6)]);
    drop(server);
    drop(scope);
    Ok(())
}
