//! The tracer follows exactly the connections of the process it traces.

use std::{collections::HashMap, thread};

use tracer_tests::{
    client::{self, ClientOptions},
    harness::*,
};

/// N connections to a traced server, each with known byte counts, while an untraced
/// process serves M others at the same time: exactly the N are reported, with their
/// ports and byte counts.
#[test]
fn reports_exactly_the_traced_connections_with_their_bytes() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 12;
    const M: usize = 15;
    let (server, addr) = start_lab_server(&[])?;
    let (_other, other_addr) = start_lab_server(&[])?;
    let tracer = start_tracer(&["--pid".into(), server.pid().to_string(), "--connections".into()])?;

    let untraced = thread::spawn(move || {
        client::run(&ClientOptions {
            server: other_addr,
            connections: M,
            requests: 2,
            size: 333,
            parallel: true,
            read_delay_ms: 0,
            rcvbuf: 0,
            pause_after_connect_ms: 0,
            paths: Vec::new(),
        })
    });
    // Different sizes per connection, so a byte count cannot match by accident.
    let mut expected = HashMap::new();
    for i in 0..N {
        let r = client::one_connection(&ClientOptions {
            server: addr,
            connections: 1,
            requests: 1 + i % 3,
            size: 1000 + 17 * i,
            parallel: false,
            read_delay_ms: 0,
            rcvbuf: 0,
            pause_after_connect_ms: 0,
            paths: Vec::new(),
        })?;
        expected.insert(r.local_port, r);
    }
    let untraced = untraced.join().expect("untraced client")?;
    assert_eq!(untraced.len(), M);

    let lines = tracer.stop()?;
    let conns: Vec<_> = lines.iter().filter(|l| l["type"] == "connection").collect();
    assert_eq!(conns.len(), N, "connections reported: {conns:#?}");
    for c in conns {
        let local: std::net::SocketAddr = c["local"].as_str().unwrap().parse()?;
        let remote: std::net::SocketAddr = c["remote"].as_str().unwrap().parse()?;
        assert_eq!(local.port(), addr.port(), "{c}");
        let want = expected.get(&remote.port()).unwrap_or_else(|| panic!("unexpected connection {c}"));
        assert_eq!(c["bytes_in"], want.bytes_sent, "{c}");
        assert_eq!(c["bytes_out"], want.bytes_received, "{c}");
        assert_eq!(c["requests"], want.requests, "{c}");
        assert_eq!(c["pid"], server.pid(), "{c}");
    }
    let report = final_report(&lines)?;
    let l = listener(report, addr.port())?;
    assert_eq!(l["connections"], N);
    assert_eq!(report["listeners"].as_array().unwrap().len(), 1, "only the traced listener: {report}");
    Ok(())
}
