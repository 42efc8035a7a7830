//! The Kubernetes manifests: kubernetes-validate, and the DaemonSet, its ConfigMap and the node
//! proxy checked against each other and against `etp check`.

use super::*;

const KUBEVAL_INSTALL: &str = "pip install kubernetes-validate==1.37.0";

fn kubernetes_validate(files: &[PathBuf]) -> Output {
    let kv = tool("kubernetes-validate", KUBEVAL_INSTALL);
    output(Command::new(kv).args(["--strict", "--no-warn"]).args(files))
}

#[test]
fn kubernetes_manifests_pass_the_schema_validator() {
    let mut files = yaml_files("deploy/kubernetes");
    files.extend(yaml_files("vagrant/demo"));
    let out = kubernetes_validate(&files);
    assert!(out.status.success(), "kubernetes-validate: {}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    for f in &files {
        let name = f.file_name().expect("file name").to_string_lossy();
        assert!(
            report.contains(&format!("{name} passed")),
            "{name} was not validated: {report}"
        );
    }

    // The validator rejects a misspelt field under --strict, so its pass above means something.
    let dir = TempDir::new("kubeval");
    let bad = read("deploy/kubernetes/daemonset.yaml").replace("hostNetwork:", "hostNetwrk:");
    let bad = dir.file("daemonset.yaml", bad.as_bytes(), 0o644);
    let out = kubernetes_validate(&[bad]);
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted a misspelt field: {}",
        text(&out)
    );
}

#[test]
fn configmaps_hold_configs_that_etp_check_accepts() {
    let dir = TempDir::new("check");
    for path in [
        "deploy/kubernetes/configmap.yaml",
        "vagrant/demo/etp-config.yaml",
    ] {
        let (raw, _) = configmap_toml(path);
        let cfg = dir.file("etp.toml", raw.as_bytes(), 0o644);
        let out = output(
            Command::new(common::etp_bin())
                .args(["check", "-c"])
                .arg(&cfg),
        );
        assert!(out.status.success(), "etp check on {path}: {}", text(&out));
    }
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

#[test]
fn daemonset_runs_etp_unprivileged_on_the_host_network_with_its_config() {
    let ds = doc("deploy/kubernetes/daemonset.yaml", "DaemonSet", "etp");
    let pod = &ds["spec"]["template"]["spec"];
    let (_, cfg) = configmap_toml("deploy/kubernetes/configmap.yaml");

    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let uid = pod["securityContext"]["runAsUser"]
        .as_i64()
        .expect("runAsUser");
    assert_ne!(uid, 0, "runAsUser");
    // The Dockerfile's USER is the same uid, so `docker run` and the pod agree.
    assert!(
        read("Dockerfile").contains(&format!("\nUSER {uid}:")),
        "Dockerfile USER is not {uid}"
    );

    let etp = container(pod, "etp");
    assert_eq!(strings(&etp["command"]), ["/usr/local/bin/etp"]);
    let port = int_at(&cfg, "listener", "port").unwrap_or(15001);
    assert_eq!(
        strings(&etp["args"]),
        [
            format!("-port={port}"),
            "--logtostderr".into(),
            "-v=2".into()
        ]
    );
    let sc = &etp["securityContext"];
    let mut add = strings(&sc["capabilities"]["add"]);
    add.sort();
    assert_eq!(add, ["NET_ADMIN", "NET_BIND_SERVICE"]);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_ne!(sc["privileged"], true);

    // Probes reach the admin address the ConfigMap sets.
    let admin = str_at(&cfg, "admin", "address").unwrap_or("127.0.0.1:15002");
    let admin: std::net::SocketAddr = admin.parse().expect("admin address");
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let get = &etp[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            get["port"].as_u64(),
            Some(u64::from(admin.port())),
            "{probe} port"
        );
        if admin.ip().is_loopback() {
            // Without host the kubelet probes the pod IP, i.e. the node's address, where a
            // loopback-bound admin endpoint does not listen.
            assert_eq!(get["host"], admin.ip().to_string(), "{probe} host");
        } else {
            assert!(
                admin.ip().is_unspecified(),
                "admin bound to one address; kubelet probes the node IP"
            );
        }
    }

    let drain = int_at(&cfg, "daemon", "drain_seconds").unwrap_or(20);
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace");
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} <= drain {drain}"
    );

    // /etc/etp is the ConfigMap (no subPath: subPath mounts never see updates), /run/etp the
    // shared emptyDir holding the pid file the reloader reads.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).expect("volume");
    let mounts = etp["volumeMounts"].as_array().expect("mounts");
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("etp has no mount at {path}"))
    };
    let config = mount("/etc/etp");
    assert!(
        config.get("subPath").is_none(),
        "subPath blocks ConfigMap updates"
    );
    assert_eq!(
        volume(config["name"].as_str().expect("name"))["configMap"]["name"],
        "etp-config"
    );
    let pid_file = str_at(&cfg, "daemon", "pid_file").unwrap_or("/run/etp/etp.pid");
    let pid_dir = Path::new(pid_file)
        .parent()
        .expect("pid dir")
        .to_str()
        .expect("utf-8");
    let run = mount(pid_dir);
    assert!(volume(run["name"].as_str().expect("name"))
        .get("emptyDir")
        .is_some());

    // The reloader signals etp: same pid namespace, same pid file, no capabilities.
    assert_eq!(pod["shareProcessNamespace"], true);
    let reloader = container(pod, "config-reloader");
    let script = strings(&reloader["command"]).join(" ");
    assert!(
        script.contains(pid_file) && script.contains("kill -HUP"),
        "{script}"
    );
    assert_eq!(
        strings(&reloader["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert!(reloader["securityContext"]["capabilities"]
        .get("add")
        .is_none());
}

#[test]
fn node_proxy_listens_where_etp_hands_off_and_runs_as_the_excluded_uid() {
    let ds = doc(
        "deploy/kubernetes/linkerd-node-proxy.yaml",
        "DaemonSet",
        "linkerd-node-proxy",
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"], true,
        "etp's hand-off goes to the node's loopback"
    );
    let proxy = container(pod, "linkerd-proxy");
    let env = |name: &str| -> String {
        proxy["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no env {name}"))
            .to_string()
    };
    for path in [
        "deploy/kubernetes/configmap.yaml",
        "vagrant/demo/etp-config.yaml",
    ] {
        let (_, cfg) = configmap_toml(path);
        let port = int_at(&cfg, "linkerd", "outbound_port").unwrap_or(4140);
        let addrs = env("LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS");
        assert!(
            addrs.split(',').any(|a| a == format!("127.0.0.1:{port}")),
            "{path}: proxy outbound {addrs} lacks 127.0.0.1:{port}"
        );
        let ipv6 = cfg
            .get("listener")
            .and_then(|l| l.get("ipv6"))
            .and_then(toml::Value::as_bool)
            .unwrap_or(true);
        assert!(
            !ipv6 || addrs.split(',').any(|a| a == format!("[::1]:{port}")),
            "{path}: IPv6 hand-off, but proxy outbound {addrs} lacks [::1]:{port}"
        );
        let uid = int_at(&cfg, "linkerd", "proxy_uid").unwrap_or(2102);
        assert_eq!(
            proxy["securityContext"]["runAsUser"].as_i64(),
            Some(uid),
            "{path}: the proxy must run as proxy_uid"
        );
    }
}
