//! etp as an unprivileged uid with only CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, granted as
//! systemd does (ambient) and as the image and pod do (file capabilities under no_new_privs),
//! and without them. CAP_NET_RAW is granted nowhere: `etp run` relays TCP and DNS without it
//! (transparent listeners and reply sockets, marked upstream sockets). CAP_NET_BIND_SERVICE is
//! what lets a UDP reply socket bind the original destination's port 53.

use super::*;
use crate::require_root;

/// The capabilities the unit, the image and the DaemonSet grant, in setpriv's syntax.
const CAPS: &str = "-all,+net_admin,+net_bind_service";

const UTIL_LINUX: &str = "apt-get install -y util-linux";

/// etp and the DaemonSet's config in a temp dir an unprivileged uid can read.
fn staged(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(tag);
    let bin = std::fs::read(common::etp_bin()).expect("read etp binary");
    let bin = dir.file("etp", &bin, 0o755);
    let (raw, _) = configmap_toml("deploy/kubernetes/configmap.yaml");
    let cfg = dir.file("etp.toml", raw.as_bytes(), 0o644);
    (dir, bin, cfg)
}

/// `setpriv` arguments: uid/gid `id`, no groups, then `caps` in the given roles.
fn setpriv_args(id: u32, inheritable_and_ambient: &str, bounding: &str, nnp: bool) -> Vec<String> {
    let mut v = vec![
        format!("--reuid={id}"),
        format!("--regid={id}"),
        "--clear-groups".to_string(),
        format!("--inh-caps={inheritable_and_ambient}"),
        format!("--ambient-caps={inheritable_and_ambient}"),
        format!("--bounding-set={bounding}"),
    ];
    if nnp {
        v.push("--no-new-privs".to_string());
    }
    v
}

fn run_as(ns: &Netns, setpriv: &[String], bin: &Path, args: &[&str]) -> Output {
    output(ns.cmd("setpriv").args(setpriv).arg(bin).args(args))
}

fn etp_table(ns: &Netns) -> Option<String> {
    let out = ns.try_exec("nft", &["list", "table", "inet", "etp"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn assert_applied(ns: &Netns, how: &str) {
    let table = etp_table(ns).unwrap_or_else(|| panic!("{how}: no table inet etp"));
    assert!(
        table.contains("tproxy") && table.contains("redirect to :4140"),
        "{how}: table inet etp lacks the tproxy and hand-off rules:\n{table}"
    );
    let rules = ns.ip(&["-4", "rule", "list"]);
    assert!(
        rules.contains("lookup 15001"),
        "{how}: no ip rule to table 15001:\n{rules}"
    );
}

#[test]
fn apply_works_as_nobody_with_only_net_admin_and_net_bind_service() {
    require_root!();
    tool("setpriv", UTIL_LINUX);
    let (_dir, bin, cfg) = staged("ambient");
    let ns = Netns::new("capamb");
    let cfg = cfg.to_str().expect("utf-8");
    // As systemd runs etp.service: a plain uid with exactly the two capabilities, ambient.
    let as_nobody = setpriv_args(65534, CAPS, CAPS, true);
    let out = run_as(&ns, &as_nobody, &bin, &["apply", "-c", cfg]);
    assert!(out.status.success(), "etp apply as nobody: {}", text(&out));
    assert_applied(&ns, "apply as nobody with NET_ADMIN+NET_BIND_SERVICE");

    let out = run_as(&ns, &as_nobody, &bin, &["cleanup", "-c", cfg]);
    assert!(
        out.status.success(),
        "etp cleanup as nobody: {}",
        text(&out)
    );
    assert!(etp_table(&ns).is_none(), "cleanup left table inet etp");
}

#[test]
fn apply_without_capabilities_fails_clearly_and_changes_nothing() {
    require_root!();
    tool("setpriv", UTIL_LINUX);
    let (_dir, bin, cfg) = staged("nocaps");
    let ns = Netns::new("capnone");
    let none = setpriv_args(65534, "-all", "-all", true);
    let out = run_as(
        &ns,
        &none,
        &bin,
        &["apply", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "etp apply without caps: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        ["not permitted", "permission denied", "cap_net_admin"]
            .iter()
            .any(|w| err.contains(w)),
        "stderr does not say a permission was missing: {}",
        text(&out)
    );
    assert!(
        etp_table(&ns).is_none(),
        "a failed apply left table inet etp"
    );
}

#[test]
fn file_capabilities_work_for_a_non_root_uid_under_no_new_privs() {
    require_root!();
    tool("setpriv", UTIL_LINUX);
    let setcap = tool("setcap", "apt-get install -y libcap2-bin");
    let (_dir, bin, cfg) = staged("filecaps");
    // What the Dockerfile does to /usr/local/bin/etp.
    let out = output(
        Command::new(setcap)
            .arg("cap_net_admin,cap_net_bind_service+ep")
            .arg(&bin),
    );
    assert!(out.status.success(), "setcap: {}", text(&out));
    let ns = Netns::new("capfile");
    let cfg = cfg.to_str().expect("utf-8");

    // What the runtime does for the pod: uid 65532, no ambient or inheritable capabilities,
    // NET_ADMIN and NET_BIND_SERVICE in the bounding set (capabilities.add, drop ALL), no_new_privs
    // (allowPrivilegeEscalation: false).
    let pod = setpriv_args(65532, "-all", CAPS, true);
    let out = run_as(&ns, &pod, &bin, &["apply", "-c", cfg]);
    assert!(
        out.status.success(),
        "file-capability etp as uid 65532: {}",
        text(&out)
    );
    assert_applied(&ns, "file capabilities, uid 65532, no_new_privs");
    let out = run_as(&ns, &pod, &bin, &["cleanup", "-c", cfg]);
    assert!(out.status.success(), "etp cleanup: {}", text(&out));

    // A container that did not add the capabilities cannot run the binary at all: the kernel
    // refuses to exec file capabilities outside the bounding set. (So the image grants
    // nothing by itself, and the reload sidecar, which has no capabilities, signals etp
    // instead of running `etp reload`.)
    let bare = setpriv_args(65532, "-all", "-all", true);
    let out = run_as(&ns, &bare, &bin, &["check", "-c", cfg]);
    assert!(
        !out.status.success(),
        "exec outside the bounding set: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "expected EPERM from execve: {}",
        text(&out)
    );
    assert!(etp_table(&ns).is_none(), "table inet etp left behind");
}

/// `etp run` as systemd runs it (uid 65534, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, ambient,
/// no_new_privs) in the shared client -- router -- server topology: an intercepted TCP
/// connection and a DNS query are relayed through etp, so transparent listeners, transparent
/// UDP reply sockets (bound to port 53) and marked upstream sockets all work without
/// CAP_NET_RAW. (With NET_ADMIN and NET_RAW, as shipped before, the DNS query timed out: the
/// reply socket's bind to port 53 failed with EACCES.)
#[test]
fn run_relays_tcp_and_dns_without_net_raw() {
    use common::topo::{curl, topo, ADMIN};
    require_root!();
    tool("setpriv", UTIL_LINUX);
    let (dir, bin, _) = staged("runcaps");
    let cfg = dir.file(
        "run.toml",
        format!(
            "[listener]\nport = 15001\n\n\
             [[route]]\nname = \"tcp\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.96.0.20/32\"]\n\
             ports = [8080]\naction = \"direct\"\n\n\
             [[route]]\nname = \"dns\"\nprotocols = [\"udp\"]\ndestinations = [\"10.96.0.10/32\"]\n\
             ports = [53]\naction = \"direct\"\n\n\
             [admin]\naddress = \"{ADMIN}\"\n\n[daemon]\npid_file = \"{}/etp.pid\"\ndrain_seconds = 1\n",
            dir.0.display()
        )
        .as_bytes(),
        0o644,
    );
    let t = topo();
    let mut args = setpriv_args(65534, CAPS, CAPS, true);
    args.push(bin.to_str().expect("utf-8").to_string());
    args.extend(["run", "-c", cfg.to_str().expect("utf-8")].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut etp = t.router.spawn("setpriv", &args);
    let ready = common::wait_for(std::time::Duration::from_secs(20), || {
        // -f: a 503 ("not ready") is a failure, not a body to match.
        let out = t.router.try_exec(
            "curl",
            &["-sf", "--max-time", "2", &format!("http://{ADMIN}/ready")],
        );
        (out.status.success() && String::from_utf8_lossy(&out.stdout) == "ready\n").then_some(())
    });
    if ready.is_none() {
        panic!(
            "etp run as nobody with NET_ADMIN+NET_BIND_SERVICE did not become ready: {}",
            text(&etp.kill_output())
        );
    }
    // The server sees the router's address: the connection went through etp (`direct`).
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    if !body.contains(" to 10.10.2.1:") {
        panic!(
            "not relayed by etp: {body}\netp: {}",
            text(&etp.kill_output())
        );
    }
    let out = t.client.try_exec(
        "dig",
        &[
            "+short",
            "+time=3",
            "+tries=2",
            "@10.96.0.10",
            "etp.test",
            "A",
        ],
    );
    if String::from_utf8_lossy(&out.stdout).trim() != "10.1.2.3" {
        panic!(
            "DNS through etp: {}\netp: {}",
            text(&out),
            text(&etp.kill_output())
        );
    }
    let metrics = curl(&t.router, &format!("http://{ADMIN}/metrics"));
    let flows = |proto: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("etp_flows_total{") && l.contains(proto))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(
        flows("proto=\"tcp\"") >= 1,
        "no TCP flow counted:\n{metrics}"
    );
    assert!(
        flows("proto=\"udp\"") >= 1,
        "no UDP flow counted:\n{metrics}"
    );
    etp.signal("TERM");
    let out = etp
        .wait_timeout(std::time::Duration::from_secs(15))
        .expect("etp exits after SIGTERM");
    assert!(out.status.success(), "etp run as nobody: {}", text(&out));
}
