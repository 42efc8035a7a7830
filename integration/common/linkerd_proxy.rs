//! A real linkerd2-proxy in a test namespace, with the fake control plane it needs.
//!
//! The binaries come from the environment: `ETP_LINKERD2_PROXY` (a linkerd2-proxy build) and
//! `ETP_LINKERD_CONTROL` (`integration/linkerd-control`, built by `make test-linkerd`). Both run
//! in the router namespace: the control plane on 127.0.0.1:8090 (loopback, so the proxy talks
//! plaintext to it), the proxy as uid 2102 (etp never intercepts that uid) with its outbound
//! listener on 127.0.0.1:4140 and [::1]:4140 and its admin server on 127.0.0.1:4191.
//!
//! The proxy serves nothing until its identity is certified; `start` waits for its
//! `/ready` (bounded) and panics with both logs when it does not come.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{run, wait_for, Netns, Proc};

pub const PROXY_ENV: &str = "ETP_LINKERD2_PROXY";
pub const CONTROL_ENV: &str = "ETP_LINKERD_CONTROL";
/// The proxy's identity: the one deploy/kubernetes/linkerd-node-proxy.yaml gives the node
/// proxy (service account `linkerd-node-proxy` in namespace `etp-system`).
pub const LOCAL_NAME: &str =
    "linkerd-node-proxy.etp-system.serviceaccount.identity.linkerd.cluster.local";
pub const CONTROL_ADDR: &str = "127.0.0.1:8090";
pub const PROXY_ADMIN: &str = "127.0.0.1:4191";
/// How long the proxy waits for a client's first bytes before it treats the connection as
/// opaque TCP (its default is 10 s, which stalls server-speaks-first protocols that long).
pub const DETECT_TIMEOUT: &str = "1s";

/// The two binaries, from the environment.
pub struct Binaries {
    pub proxy: PathBuf,
    pub control: PathBuf,
}

/// The binaries, or why the real-proxy tests cannot run here.
pub fn binaries() -> Result<Binaries, String> {
    let get = |var: &str| -> Result<PathBuf, String> {
        let p = std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| {
                format!("{var} is not set (`make test-linkerd LINKERD2_PROXY=PATH` sets it)")
            })?;
        if !p.is_file() {
            return Err(format!("{var}={} is not a file", p.display()));
        }
        Ok(p)
    };
    Ok(Binaries {
        proxy: get(PROXY_ENV)?,
        control: get(CONTROL_ENV)?,
    })
}

/// A directory removed (with its contents) on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = super::COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("etpt-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        // The proxy (uid 2102) reads its identity documents below this directory.
        run(Command::new("chmod").args(["755", path.to_str().expect("utf-8 path")]));
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The fake control plane and the proxy, killed on drop (proxy first).
pub struct RealProxy {
    pub proxy: Proc,
    pub control: Proc,
    pub ns: String,
    pub dir: TempDir,
    /// Where the test reaches the proxy's admin server.
    pub admin: String,
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

impl RealProxy {
    /// Starts the control plane, then the proxy, in `router`; waits until the proxy is ready.
    pub fn start(router: &Netns, bins: &Binaries) -> RealProxy {
        RealProxy::start_with(router, bins, &[], PROXY_ADMIN)
    }

    /// `start`, with `env` set on the proxy over the test's own settings, except the control
    /// plane's addresses and the identity documents, which are always the fake's; the test
    /// reaches the admin server at `admin`.
    pub fn start_with(
        router: &Netns,
        bins: &Binaries,
        env: &[(String, String)],
        admin: &str,
    ) -> RealProxy {
        let dir = TempDir::new("linkerd");
        let control_log = dir.path.join("control.log");
        let control = router
            .cmd(bins.control.to_str().expect("utf-8 path"))
            .args(["--dir", dir.path.to_str().expect("utf-8 path")])
            .args(["--name", LOCAL_NAME, "--listen", CONTROL_ADDR])
            .args(["--log", control_log.to_str().expect("utf-8 path")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file(&dir.path.join("control.err"))))
            .spawn()
            .expect("spawn the fake control plane");
        let mut rp = RealProxy {
            proxy: Proc { child: None },
            control: Proc {
                child: Some(control),
            },
            ns: router.name.clone(),
            dir,
            admin: admin.to_string(),
        };
        let up = wait_for(Duration::from_secs(20), || {
            rp.dir.path.join("ready").exists().then_some(())
        });
        assert!(up.is_some(), "control plane did not start: {}", rp.logs());

        let trust_anchors =
            std::fs::read_to_string(rp.dir.path.join("ca.pem")).expect("read ca.pem");
        let path = |p: &str| rp.dir.path.join(p).display().to_string();
        let proxy_log = log_file(&rp.dir.path.join("proxy.log"));
        let mut cmd = router.cmd("setpriv");
        cmd.args(["--reuid=2102", "--regid=2102", "--clear-groups"])
            .arg(&bins.proxy)
            // The test's settings; `env` may override them.
            .env("LINKERD2_PROXY_LOG", "warn,linkerd=info")
            .env(
                "LINKERD2_PROXY_POLICY_WORKLOAD",
                r#"{"ns":"etp-system","pod":"etp"}"#,
            )
            .env("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", LOCAL_NAME)
            .env(
                "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS",
                "127.0.0.1:4140,[::1]:4140",
            )
            .env("LINKERD2_PROXY_INBOUND_LISTEN_ADDR", "127.0.0.1:4143")
            .env("LINKERD2_PROXY_CONTROL_LISTEN_ADDR", "127.0.0.1:4190")
            .env("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", PROXY_ADMIN)
            .env("LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT", DETECT_TIMEOUT)
            .envs(env.iter().map(|(k, v)| (k, v)))
            // The fake control plane and the documents it wrote: always these.
            .env("LINKERD2_PROXY_DESTINATION_SVC_ADDR", CONTROL_ADDR)
            .env("LINKERD2_PROXY_POLICY_SVC_ADDR", CONTROL_ADDR)
            .env("LINKERD2_PROXY_IDENTITY_SVC_ADDR", CONTROL_ADDR)
            .env("LINKERD2_PROXY_IDENTITY_DIR", path("id"))
            .env("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", path("token"))
            .env("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", trust_anchors)
            .stdin(Stdio::null())
            .stdout(Stdio::from(proxy_log.try_clone().expect("dup log")))
            .stderr(Stdio::from(proxy_log));
        rp.proxy.child = Some(cmd.spawn().expect("spawn linkerd2-proxy"));

        // A dev build certifies and starts within a few seconds; 60 s bounds a loaded machine.
        let ready = wait_for(Duration::from_secs(60), || {
            if let Some(Ok(Some(status))) = rp.proxy.child.as_mut().map(|c| c.try_wait()) {
                return Some(Err(format!("linkerd2-proxy exited: {status}")));
            }
            (rp.get("/ready").0 == 200).then_some(Ok(()))
        });
        match ready {
            Some(Ok(())) => rp,
            Some(Err(e)) => panic!("{e}; {}", rp.logs()),
            None => panic!("linkerd2-proxy not ready within 60 s; {}", rp.logs()),
        }
    }

    /// `GET PATH` on the proxy's admin server.
    pub fn get(&self, path: &str) -> (u16, String) {
        super::topo::http_get(&self.ns, &format!("http://{}{path}", self.admin))
    }

    pub fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "GET {}/metrics: {body}", self.admin);
        body
    }

    /// The control plane's request lines (`policy target=ADDR ...`, `certify ...`).
    pub fn control_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path.join("control.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Both processes' output, for failure messages.
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path.join(f)).unwrap_or_default();
        format!(
            "control plane:\n{}{}\nproxy:\n{}",
            read("control.log"),
            read("control.err"),
            read("proxy.log")
        )
    }
}

impl Drop for RealProxy {
    fn drop(&mut self) {
        // A failing test shows what the proxy and its control plane said.
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// How many connections the proxy's outbound listener accepted for original destination
/// `target` (`tcp_open_total{direction="outbound",peer="src",target_addr="..."}`, summed over
/// the other labels).
pub fn outbound_opens(metrics: &str, target: &str) -> u64 {
    let label = format!("target_addr=\"{target}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("tcp_open_total{"))
        .filter(|l| l.contains("direction=\"outbound\"") && l.contains("peer=\"src\""))
        .filter(|l| l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
