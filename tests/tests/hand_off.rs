//! A server that hands requests from its reader thread to a worker pool (`lab
//! hand-off`): the worker that calls the upstream is not the thread that read the
//! request. Two kinds of requests: one calls peer A (40 ms), the other peer B (5 ms)
//! and then waits 15 ms on its own. The truth is the server's own clock. The tracer
//! must either attribute each peer its true share of think, or report those upstream
//! calls as unattributed with all think local — never charge a wait to the wrong
//! request (an A wait charged to a B request would be clipped to that request's
//! shorter think and A's share would fall short).

use tracer_tests::{harness::*, load};

const CONNECTIONS: usize = 4;
const REQUESTS: usize = 40;

#[test]
fn hand_off_to_workers_is_attributed_or_unattributed() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_a, a) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "40"])?;
    let (_b, b) = start_lab_server(&["--scenario", "slow-think", "--delay-ms", "5"])?;
    let mut server =
        start_lab_process(&["hand-off", "--workers", "4", "--backend", &a.to_string(), "--backend", &b.to_string()])?;

    let tracer = start_tracer(&["--pid".into(), server.proc.pid().to_string()])?;
    // Requests alternate between the kinds on every connection.
    let served = load::run(server.addr, CONNECTIONS, REQUESTS, |_, i| {
        if i % 2 == 0 {
            "/?peer=0&local=0".to_owned()
        } else {
            "/?peer=1&local=15".to_owned()
        }
    })?;
    let lines = tracer.stop()?;
    let own = server.ask()?;
    let report = final_report(&lines)?;

    let (a, b) = (a.to_string(), b.to_string());
    let truth_a = 100.0 * own["upstream_ns_0"] / own["handling_ns"];
    let truth_b = 100.0 * own["upstream_ns_1"] / own["handling_ns"];
    let l = listener(report, server.addr.port())?;
    let (peer_a, peer_b) = (upstream_peer(report, &a)?, upstream_peer(report, &b)?);
    let (measured_a, measured_b) = (attributed_pct(l, Some(&a)), attributed_pct(l, Some(&b)));
    eprintln!(
        "{}server's own: {own:?}: truth A {truth_a:.1}%, B {truth_b:.1}%; tracer A {measured_a:.1}%, B {measured_b:.1}%",
        describe(report)
    );

    // The truth side: every request served, half of them through each peer.
    let total = CONNECTIONS * REQUESTS;
    assert_eq!(served, total);
    assert_eq!(own["requests"], total as f64, "{own:?}");
    assert_eq!((own["calls_0"], own["calls_1"]), ((total / 2) as f64, (total / 2) as f64), "{own:?}");
    assert!(own["upstream_ns_0"] >= (total / 2) as f64 * 40e6, "{own:?}");

    let mut v = http_server_verdicts(report, server.addr.port(), total as u64, own["handling_ns"])?;
    v.eq("upstream exchanges with A", peer_a["requests"].as_u64(), Some(own["calls_0"] as u64));
    v.eq("upstream exchanges with B", peer_b["requests"].as_u64(), Some(own["calls_1"] as u64));

    // Either each peer's share matches the truth…
    let mut attributed = Verdicts::default();
    attributed.near("share of think attributed to A (%) against the server's own", measured_a, truth_a, 0.0, 5.0);
    attributed.near("share of think attributed to B (%) against the server's own", measured_b, truth_b, 0.0, 5.0);
    // …or every call to A and B is unattributed and think is all local.
    let mut unattributed = Verdicts::default();
    for (name, peer, p) in [("A", &a, peer_a), ("B", &b, peer_b)] {
        unattributed.eq(&format!("unattributed calls to {name}"), p["unattributed"].as_u64(), p["requests"].as_u64());
        unattributed.eq(&format!("think attributed to {name} (ns)"), peer_wait_ns(l, Some(peer)), 0);
    }
    unattributed.eq("local think (ns)", l["think_attribution"]["local_ns"].as_u64(), Some(think_ns(l)));
    let (attributed, unattributed) = (attributed.into_failures(), unattributed.into_failures());
    v.check(attributed.is_empty() || unattributed.is_empty(), || {
        format!(
            "neither attributed right nor unattributed:\n    {}\n    or\n    {}",
            attributed.join("\n    "),
            unattributed.join("\n    ")
        )
    });
    eprintln!(
        "outcome: {}",
        match (attributed.is_empty(), unattributed.is_empty()) {
            (true, _) => "attributed per peer",
            (_, true) => "unattributed, think local",
            _ => "neither",
        }
    );
    v.finish();
    Ok(())
}
