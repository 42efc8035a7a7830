//! etp beside a kube-proxy-like NAT table on the same node.
//!
//! kube-proxy translates a ClusterIP to an endpoint with DNAT in nat prerouting (priority -100)
//! and nat output (-100). etp's tproxy rule runs earlier (mangle, -150), so the accepted socket's
//! local address is already the endpoint; etp takes the original destination from conntrack
//! (`SO_ORIGINAL_DST`) so that Linkerd is handed the ClusterIP. etp's hand-off redirect sits at
//! nat output priority -110, before kube-proxy's output DNAT: only a connection's first NAT
//! binding counts, and a DNAT first would send the hand-off past Linkerd.

mod common;

use common::topo::{
    curl, dig, metric, standin_lines, start_etp, start_standin, start_standin_with, stop_etp, topo,
};
use common::TempFile;

const CFG: &str = r#"
[listener]
port = 15001

[[route]]
name = "mesh"
protocols = ["tcp"]
destinations = ["10.96.0.0/12", "fd00:10:96::/112"]
ports = [80, 8080]
action = "linkerd"
"#;

/// ClusterIP 10.96.0.99:80 (and [fd00:10:96::63]:80) -> endpoint 10.96.0.10:8080, as kube-proxy's
/// nftables mode programs it: one DNAT in prerouting, one in output, its own table.
const KUBE_PROXY: &str = r#"
table ip kube-proxy-test {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.96.0.99 tcp dport 80 dnat to 10.96.0.10:8080
	}
	chain out {
		type nat hook output priority -100; policy accept;
		ip daddr 10.96.0.99 tcp dport 80 dnat to 10.96.0.10:8080
	}
}
table ip6 kube-proxy-test {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip6 daddr fd00:10:96::63 tcp dport 80 dnat to [fd00:10:96::a]:8080
	}
	chain out {
		type nat hook output priority -100; policy accept;
		ip6 daddr fd00:10:96::63 tcp dport 80 dnat to [fd00:10:96::a]:8080
	}
}
"#;

#[test]
fn linkerd_is_handed_the_cluster_ip_not_the_endpoint() {
    require_root!();
    let t = topo();
    let rules = TempFile::new("kube-proxy.nft", KUBE_PROXY);
    t.router.nft(&["-f", rules.as_str()]);
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin(&t.router, &log);
    let etp = start_etp(&t.router, CFG);

    // The client talks to the ClusterIP; the answer comes from the endpoint behind it.
    let body = curl(&t.client, "http://10.96.0.99/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    let body = curl(&t.client, "http://[fd00:10:96::63]/");
    assert!(
        body.starts_with("hello from [fd00:10:96::a]:8080"),
        "{body}"
    );

    let m = stop_etp(etp);
    let lines = standin_lines(&log);
    assert_eq!(
        lines.len(),
        2,
        "both connections reached Linkerd: {lines:?}"
    );
    assert!(lines[0].starts_with("orig_dst=10.96.0.99:80 "), "{lines:?}");
    assert!(
        lines[1].starts_with("orig_dst=[fd00:10:96::63]:80 "),
        "{lines:?}"
    );
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="mesh",action="linkerd",proto="tcp"}"#
        ),
        2,
        "{m}"
    );
    // kube-proxy's own table is untouched by etp.
    let listed = t.router.nft(&["list", "table", "ip", "kube-proxy-test"]);
    assert!(listed.contains("dnat to 10.96.0.10:8080"), "{listed}");
}

/// The kernel hand-off beside kube-proxy: etp's DNAT to the hand-off address (nat prerouting
/// and output, -110) is the connection's first NAT binding, so the proxy's `SO_ORIGINAL_DST`
/// is the ClusterIP, and kube-proxy's DNAT (-100) does not apply to it.
#[test]
fn kernel_handoff_hands_linkerd_the_cluster_ip() {
    require_root!();
    let t = topo();
    let rules = TempFile::new("kube-proxy.nft", KUBE_PROXY);
    t.router.nft(&["-f", rules.as_str()]);
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin_with(
        &t.router,
        &log,
        &["--listen", "169.254.15.1", "--listen", "fd00:15::1"],
        4,
    );
    let cfg = format!("{CFG}\n[linkerd]\nhandoff = \"kernel\"\n")
        .replace("port = 15001", "port = 15001\nlocal = true");
    let etp = start_etp(&t.router, &cfg);
    let body = curl(&t.client, "http://10.96.0.99/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    let body = curl(&t.client, "http://[fd00:10:96::63]/");
    assert!(
        body.starts_with("hello from [fd00:10:96::a]:8080"),
        "{body}"
    );
    // Node-local clients too (nat output).
    let body = curl(&t.router, "http://10.96.0.99/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    let _ = stop_etp(etp);
    let lines = standin_lines(&log);
    assert_eq!(
        lines.len(),
        3,
        "every connection reached Linkerd: {lines:?}"
    );
    assert!(
        lines[0].starts_with("orig_dst=10.96.0.99:80 peer=10.10.1.2:"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("orig_dst=[fd00:10:96::63]:80 peer=[fd10:1::2]:"),
        "{lines:?}"
    );
    assert!(lines[2].starts_with("orig_dst=10.96.0.99:80 "), "{lines:?}");
}

const CFG_UDP: &str = r#"
[listener]
port = 15001

[[route]]
name = "dns"
protocols = ["udp"]
destinations = ["10.96.0.98/32", "fd00:10:96::62/128"]
ports = [53]
action = "forward"
forward_to = "10.96.0.10:53"
"#;

/// kube-dns's ClusterIP 10.96.0.98:53 (and [fd00:10:96::62]:53) -> an endpoint where nothing
/// answers: only etp's `forward` route can get an answer.
const KUBE_PROXY_UDP: &str = r#"
table ip kube-proxy-test {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.96.0.98 udp dport 53 dnat to 10.96.0.40:53
	}
}
table ip6 kube-proxy-test {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip6 daddr fd00:10:96::62 udp dport 53 dnat to [fd00:10:96::28]:53
	}
}
"#;

/// A UDP route written for a ClusterIP (a node-local DNS cache for kube-dns) matches although
/// kube-proxy's DNAT runs after etp's tproxy rule: etp reads the pre-DNAT destination from
/// conntrack. The answer still comes from the ClusterIP (dig checks), through conntrack's
/// reverse translation of etp's reply.
#[test]
fn a_udp_route_for_a_cluster_ip_matches_behind_dnat() {
    require_root!();
    let t = topo();
    let rules = TempFile::new("kube-proxy-udp.nft", KUBE_PROXY_UDP);
    t.router.nft(&["-f", rules.as_str()]);
    let etp = start_etp(&t.router, CFG_UDP);
    assert_eq!(dig(&t.client, "10.96.0.98"), "10.1.2.3");
    assert_eq!(dig(&t.client, "fd00:10:96::62"), "10.1.2.3");
    let m = stop_etp(etp);
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="dns",action="forward",proto="udp"}"#
        ),
        2,
        "{m}"
    );
}
