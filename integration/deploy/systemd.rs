//! The systemd unit and sysusers snippet: systemd-analyze verify and security, the
//! directives against the config's deadlines and limits, systemd-sysusers in a scratch root.

use super::*;

const SYSTEMD_INSTALL: &str = "apt-get install -y systemd";

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze", SYSTEMD_INSTALL);
    let dir = TempDir::new("verify");
    let unit = unit_copy(&dir, |u| u);
    let out = output(Command::new(&analyze).arg("verify").arg(&unit));
    // verify exits 0 on directives it ignores but prints them: silence is the pass.
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify printed warnings: {}",
        text(&out)
    );

    // The same check notices a broken directive, so its silence above means something.
    let broken = unit_copy(&dir, |u| u.replace("Type=notify", "Type=notifyy"));
    let out = output(Command::new(&analyze).arg("verify").arg(&broken));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("notifyy"),
        "systemd-analyze verify did not flag a bad Type=: {}",
        text(&out)
    );
}

#[test]
fn systemd_unit_exposure_is_at_most_2_0() {
    let analyze = tool("systemd-analyze", SYSTEMD_INSTALL);
    let dir = TempDir::new("security");
    let unit = unit_copy(&dir, |u| u);
    // Offline scoring of the unit file: 0.0 (locked down) .. 10.0; --threshold is in tenths.
    let out = output(
        Command::new(&analyze)
            .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
            .arg(&unit),
    );
    assert!(
        out.status.success(),
        "etp.service exposure above 2.0: {}",
        text(&out)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("Overall exposure level for etp.service"),
        "no exposure score: {report}"
    );
}

#[test]
fn systemd_unit_grants_two_capabilities_and_outlasts_the_drain() {
    let unit = parse_unit(&read("deploy/systemd/etp.service"));
    let svc = unit.get("Service").expect("[Service] section");
    let one = |k: &str| -> &str {
        let v = svc
            .get(k)
            .unwrap_or_else(|| panic!("[Service] has no {k}="));
        assert_eq!(v.len(), 1, "{k}= given more than once: {v:?}");
        &v[0]
    };

    assert_eq!(one("Type"), "notify");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    let start: Vec<&str> = one("ExecStart").split_whitespace().collect();
    assert_eq!(start[..2], ["/usr/local/bin/etp", "run"], "ExecStart");
    let user = one("User");
    assert!(
        !user.is_empty() && user != "root" && user != "0",
        "User={user}"
    );

    let caps: BTreeSet<String> = ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
        .map(String::from)
        .into();
    assert_eq!(
        words(&svc["CapabilityBoundingSet"]),
        caps,
        "CapabilityBoundingSet"
    );
    assert_eq!(
        words(&svc["AmbientCapabilities"]),
        caps,
        "AmbientCapabilities"
    );
    let families: BTreeSet<String> = ["AF_NETLINK", "AF_INET", "AF_INET6", "AF_UNIX"]
        .map(String::from)
        .into();
    assert_eq!(words(&svc["RestrictAddressFamilies"]), families);

    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(one(k), v, "{k}=");
    }
    // etp configures the host's own network: a private network or user namespace would leave
    // it applying rules nobody's traffic passes through, with capabilities that do not count.
    for k in ["PrivateNetwork", "PrivateUsers"] {
        assert!(
            svc.get(k).is_none_or(|v| v.iter().all(|x| x == "no")),
            "{k}= must not be set"
        );
    }

    // The deadlines and limits against the config's.
    let cfg: toml::Table = read("deploy/etp.example.toml")
        .parse()
        .expect("example TOML");
    let drain = int_at(&cfg, "daemon", "drain_seconds").unwrap_or(20);
    let stop: i64 = one("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > drain,
        "TimeoutStopSec={stop} must exceed drain_seconds={drain}"
    );
    let tcp = int_at(&cfg, "limits", "max_tcp_flows").unwrap_or(65536);
    let udp = int_at(&cfg, "limits", "max_udp_flows").unwrap_or(16384);
    let nofile: i64 = one("LimitNOFILE").parse().expect("LimitNOFILE number");
    assert!(
        nofile >= 2 * tcp + udp,
        "LimitNOFILE={nofile} below two fds per TCP flow plus one per UDP flow ({})",
        2 * tcp + udp
    );

    // The pid file that `etp reload` reads lives in the directory systemd creates for etp.
    let pid_file = str_at(&cfg, "daemon", "pid_file").unwrap_or("/run/etp/etp.pid");
    let run_dir = format!("/run/{}/", one("RuntimeDirectory"));
    assert!(
        pid_file.starts_with(&run_dir),
        "pid_file {pid_file} is not under RuntimeDirectory {run_dir}"
    );
}

#[test]
fn sysusers_snippet_creates_a_system_user_without_login() {
    let sysusers = tool("systemd-sysusers", SYSTEMD_INSTALL);
    let root = TempDir::new("sysusers");
    std::fs::create_dir_all(root.0.join("etc")).expect("mkdir etc");
    let out = output(
        Command::new(sysusers)
            .arg(format!("--root={}", root.0.display()))
            .arg(repo().join("deploy/systemd/etp.sysusers")),
    );
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = std::fs::read_to_string(root.0.join("etc/passwd")).expect("passwd written");
    let unit = parse_unit(&read("deploy/systemd/etp.service"));
    let user = &unit["Service"]["User"][0];
    let entry: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap_or_else(|| panic!("sysusers made no user {user}: {passwd}"))
        .split(':')
        .collect();
    let uid: u32 = entry[2].parse().expect("uid");
    assert!(
        (1..1000).contains(&uid),
        "{user} uid {uid} is not a system uid"
    );
    assert!(
        entry[6].ends_with("nologin"),
        "{user} has a login shell: {}",
        entry[6]
    );
}
