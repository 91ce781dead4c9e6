//! `--cgroup`: the processes of a cgroup, chosen in the kernel by cgroup id. Lab servers
//! in cgroups the test creates, and one outside them: the tracer must report exactly
//! the listeners of the cgroups it was given, with their exact request counts; a server
//! moved into the cgroup after the tracer started is traced from its next connection;
//! a server in its own PID and network namespace (as a container's) is traced by its
//! cgroup, with the addresses its client saw; two servers on one port in two network
//! namespaces (two containers' `:8080`) are two listeners.

use std::os::unix::fs::MetadataExt as _;

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

/// Two "containers": lab servers on the same port, each in a network namespace of its
/// own, traced at once by their cgroup (and then with `--all`). Each must be a listener
/// of its own, named by its namespace, with its own exact request count, its bound
/// address, and a check scoped to it.
#[test]
fn one_port_in_two_network_namespaces_is_two_listeners() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cg = TestCgroup::new()?;
    let (one, two) = (Netns::new()?, Netns::new()?);
    let (server_one, addr) = start_lab_server_in(Some(&one), &[])?;
    let listen = addr.to_string();
    let (server_two, addr_two) = start_lab_server_in(Some(&two), &["--listen", &listen])?;
    assert_eq!(addr, addr_two);
    // `ip netns exec` runs the server as its child: the namespace is the server's own.
    let netns_of = |pid: u32| -> Result<u64> {
        let server = procs_children(pid).into_iter().next().unwrap_or(pid);
        Ok(std::fs::metadata(format!("/proc/{server}/ns/net"))?.ino())
    };
    let expected = [(netns_of(server_one.pid())?, 5u64), (netns_of(server_two.pid())?, 8u64)];
    cg.add(server_one.pid())?;
    cg.add(server_two.pid())?;
    for children in [procs_children(server_one.pid()), procs_children(server_two.pid())] {
        for pid in children {
            cg.add(pid)?;
        }
    }
    for selection in [vec!["--cgroup".to_owned(), cg.path.clone()], vec!["--all".to_owned()]] {
        let mut args = selection.clone();
        for (netns, n) in expected {
            args.push("--check".into());
            args.push(format!("requests[:{}@{netns}]=={n}", addr.port()));
        }
        args.push("--check".into());
        args.push(format!("requests[:{}]=={}", addr.port(), expected[0].1 + expected[1].1));
        let tracer = start_tracer(&args)?;
        run_lab_client(Some(&one), &["--server", &listen, "--requests", "5"])?;
        run_lab_client(Some(&two), &["--server", &listen, "--requests", "8"])?;
        let lines = tracer.stop()?;
        let report = final_report(&lines)?;
        eprintln!("{selection:?}: {}", describe(report));
        let mut seen: Vec<(u64, u64)> = report["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["port"] == addr.port())
            .map(|l| {
                assert_eq!(l["addresses"], serde_json::json!([listen]), "{l}");
                assert_eq!(l["other_netns"], true, "{l}");
                (l["netns"].as_u64().unwrap_or(0), l["requests"].as_u64().unwrap_or(0))
            })
            .collect();
        seen.sort();
        let mut want = expected.to_vec();
        want.sort();
        assert_eq!(seen, want, "{selection:?}: (netns, requests) of the listeners on {listen}");
        let checks = &report["checks"];
        assert!(checks.as_array().is_some_and(|c| c.len() == 3 && c.iter().all(|v| v["passed"] == true)), "{checks}");
    }
    Ok(())
}

/// The children of `pid` (from /proc/PID/task/*/children).
fn procs_children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
