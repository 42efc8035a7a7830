//! The client -- router -- server topology shared by the data-path and daemon tests, with etp
//! (the real `etp run -c CFG`) in the router namespace.
//!
//! Addresses: client 10.10.1.2 / fd10:1::2, router 10.10.1.1 fd10:1::1 | 10.10.2.1 fd10:2::1,
//! server 10.10.2.2 / fd10:2::2 plus "service" addresses on its lo (10.96.0.10, .20, .21, .22
//! and fd00:10:96::a, ::14, ::15), routed via the router. 10.96.0.30 / fd00:10:96::1e exist
//! nowhere: only etp's `forward` routes make them answer.
//!
//! Servers in the server ns: `etp-testkit serve` (echo 7001, banner 7002, hash 7003, source
//! 7004, HTTP 8080; UDP echo 7001) and dnsmasq (port 53, `etp.test` -> 10.1.2.3).
//! Every client call has a timeout; no assertion depends on timing.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{etp_bin, link, run, wait_for, Netns, Proc, TempFile};

/// The admin endpoint etp serves inside the router namespace (its own loopback).
pub const ADMIN: &str = "127.0.0.1:15002";

pub fn example(name: &str) -> String {
    let bin = etp_bin();
    let dir = bin.parent().expect("target dir");
    dir.join("examples").join(name).display().to_string()
}

/// The three namespaces with addresses, routes and servers running.
pub struct Topo {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    pub _servers: Vec<Proc>,
}

impl Topo {
    /// Adds `10.10.1.{n}` for each `n` to the client's interface, so that one client namespace
    /// plays several sources.
    pub fn add_client_addrs(&self, hosts: &[u8]) {
        for n in hosts {
            self.client
                .ip(&["addr", "add", &format!("10.10.1.{n}/24"), "dev", "eth0"]);
        }
    }
}

/// A TCP connection from `src` (an address of the calling thread's namespace) to `dst`.
pub fn connect_from(
    src: &str,
    dst: &str,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    let dst: std::net::SocketAddr = dst.parse().expect("destination address");
    let src = std::net::SocketAddr::new(src.parse().expect("source address"), 0);
    let s = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )?;
    // A bind failure is the test's own setup going wrong, never an answer from etp.
    s.bind(&src.into()).expect("bind the client address");
    s.connect_timeout(&dst.into(), timeout)?;
    Ok(s.into())
}

const SERVICE_ADDRS: [&str; 7] = [
    "10.96.0.10/32",
    "10.96.0.20/32",
    "10.96.0.21/32",
    "10.96.0.22/32",
    "fd00:10:96::a/128",
    "fd00:10:96::14/128",
    "fd00:10:96::15/128",
];

pub fn topo() -> Topo {
    let client = Netns::new("cli");
    let router = Netns::new("rtr");
    let server = Netns::new("srv");
    link(
        &client,
        "eth0",
        &["10.10.1.2/24", "fd10:1::2/64"],
        &router,
        "c0",
        &["10.10.1.1/24", "fd10:1::1/64"],
    );
    link(
        &router,
        "s0",
        &["10.10.2.1/24", "fd10:2::1/64"],
        &server,
        "eth0",
        &["10.10.2.2/24", "fd10:2::2/64"],
    );
    router.forwarding();
    client.ip(&["route", "add", "default", "via", "10.10.1.1"]);
    client.ip(&["-6", "route", "add", "default", "via", "fd10:1::1"]);
    server.ip(&["route", "add", "default", "via", "10.10.2.1"]);
    server.ip(&["-6", "route", "add", "default", "via", "fd10:2::1"]);
    for a in SERVICE_ADDRS {
        server.ip(&["addr", "add", a, "dev", "lo"]);
    }
    router.ip(&["route", "add", "10.96.0.0/12", "via", "10.10.2.2"]);
    router.ip(&["-6", "route", "add", "fd00:10:96::/112", "via", "fd10:2::2"]);
    let mut ips = vec!["10.10.2.2", "fd10:2::2"];
    ips.extend(SERVICE_ADDRS.iter().map(|a| a.split('/').next().unwrap()));
    let mut args = vec!["serve"];
    args.extend(ips.iter().copied());
    let testkit = server.spawn(&example("etp-testkit"), &args);
    let dns = server.spawn(
        "dnsmasq",
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file",
            "--user=root",
            "--bind-interfaces",
            "--address=/etp.test/10.1.2.3",
            "--listen-address=10.10.2.2,fd10:2::2,10.96.0.10,fd00:10:96::a",
        ],
    );
    wait_listening(&server, "-Hltn", "sport = :8080", 9);
    wait_listening(&server, "-Hlun", "sport = :53", 4);
    Topo {
        client,
        router,
        server,
        _servers: vec![testkit, dns],
    }
}

/// Waits until `ss FLAGS FILTER` in `ns` lists at least `n` sockets.
pub fn wait_listening(ns: &Netns, flags: &str, filter: &str, n: usize) {
    let ok = wait_for(Duration::from_secs(10), || {
        let out = ns.try_exec("ss", &[flags, filter]);
        (String::from_utf8_lossy(&out.stdout).lines().count() >= n).then_some(())
    });
    assert!(
        ok.is_some(),
        "{filter} not listening ({n} sockets) in {}",
        ns.name
    );
}

/// The `[admin]` and `[daemon]` settings a test gives etp (appended to the config body, which
/// must not have these tables itself).
#[derive(Debug, Clone)]
pub struct Opts {
    pub drain_seconds: u64,
    pub resync_seconds: u64,
    /// The command line after the binary; `CFG` is replaced by the config path.
    pub args: Vec<String>,
    /// `RUST_LOG` for etp (`None`: unset, so `-v` decides).
    pub rust_log: Option<String>,
    /// `[daemon] fail_closed`.
    pub fail_closed: bool,
    /// `[daemon] watch_kernel`.
    pub watch_kernel: bool,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            drain_seconds: 1,
            resync_seconds: 30,
            args: ["run", "-c", "CFG"].map(String::from).to_vec(),
            rust_log: Some("etp=debug".to_string()),
            fail_closed: false,
            watch_kernel: true,
        }
    }
}

/// `etp run` in the router namespace, with its own config file, pid file and log file.
pub struct Etp {
    pub proc: Proc,
    pub ns: String,
    pub cfg: TempFile,
    pub pid_file: PathBuf,
    pub log: PathBuf,
    pub opts: Opts,
}

impl Drop for Etp {
    fn drop(&mut self) {
        // Kill before removing its files; the namespace's Drop kills it too, but a test that
        // restarts etp in the same namespace needs it gone now.
        if let Some(mut c) = self.proc.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// Starts `etp run -c CFG` in `router` with default options and waits until `/ready` is 200.
pub fn start_etp(router: &Netns, body: &str) -> Etp {
    start_etp_with(router, body, Opts::default())
}

/// Starts etp as `opts.args` says and waits until `/ready` is 200 (panics with the log if etp
/// exits or does not become ready within 20 s).
pub fn start_etp_with(router: &Netns, body: &str, opts: Opts) -> Etp {
    let etp = spawn_etp(router, body, opts);
    etp.wait_ready();
    etp
}

/// Starts etp without waiting for it.
pub fn spawn_etp(router: &Netns, body: &str, opts: Opts) -> Etp {
    let cfg = TempFile::new("etp.toml", "");
    let pid_file = cfg.path.with_extension("pid");
    let log = cfg.path.with_extension("log");
    let mut etp = Etp {
        proc: Proc { child: None },
        ns: router.name.clone(),
        cfg,
        pid_file,
        log,
        opts,
    };
    etp.write_config(body);
    let args: Vec<String> = etp
        .opts
        .args
        .iter()
        .map(|a| a.replace("CFG", etp.cfg.as_str()))
        .collect();
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&etp.log)
        .expect("open etp log");
    let mut cmd = router.cmd(etp_bin().to_str().expect("utf-8 path"));
    cmd.args(&args).env_remove("RUST_LOG");
    if let Some(filter) = &etp.opts.rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let child = cmd
        // Plain text in the log file: tests search it for messages and fields.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("spawn etp");
    etp.proc.child = Some(child);
    etp
}

impl Etp {
    /// The full config text for `body`: the test's routes plus this instance's admin address,
    /// pid file and daemon timings.
    pub fn config_text(&self, body: &str) -> String {
        format!(
            "{body}\n[admin]\naddress = \"{ADMIN}\"\n\n[daemon]\npid_file = \"{}\"\n\
             drain_seconds = {}\nresync_seconds = {}\nfail_closed = {}\nwatch_kernel = {}\n",
            self.pid_file.display(),
            self.opts.drain_seconds,
            self.opts.resync_seconds,
            self.opts.fail_closed,
            self.opts.watch_kernel
        )
    }

    /// Replaces the config file atomically (write + rename), so that a reload never reads a
    /// half-written file.
    pub fn write_config(&self, body: &str) {
        let tmp = self.cfg.path.with_extension("toml.new");
        std::fs::write(&tmp, self.config_text(body)).expect("write config");
        std::fs::rename(&tmp, &self.cfg.path).expect("rename config");
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exit status if etp has exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.child.as_mut()?.try_wait().ok().flatten()
    }

    /// `GET PATH` on the admin endpoint: (HTTP code, body); code 0 when nothing answered.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.ns, &format!("http://{ADMIN}{path}"))
    }

    pub fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "GET /metrics: {body}");
        body
    }

    /// Metrics once no TCP flow is open any more (so byte counters are final); waits at most
    /// 10 s, then returns what there is.
    pub fn settled_metrics(&self) -> String {
        let mut last = String::new();
        let _ = wait_for(Duration::from_secs(10), || {
            last = self.metrics();
            (sum(&last, "etp_flows_active{") == sum_udp_active(&last)).then_some(())
        });
        last
    }

    pub fn wait_ready(&self) {
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(c) = self.proc.child.as_ref() {
                // Not reaped here: `kill -0` tells whether the pid still runs.
                let alive = Command::new("kill")
                    .args(["-0", &c.id().to_string()])
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !alive {
                    return Some(false);
                }
            }
            (self.get("/ready").0 == 200).then_some(true)
        });
        assert_eq!(
            ok,
            Some(true),
            "etp did not become ready; log:\n{}",
            self.log_text()
        );
    }

    /// Runs `etp ARGS -c CFG` (a one-shot subcommand) in the router namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_config(args, self.cfg.as_str())
    }

    /// Runs `etp ARGS -c CONFIG` in the router namespace.
    pub fn cli_with_config(&self, args: &[&str], config: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(etp_bin())
            .args(args)
            .args(["-c", config])
            .env_remove("RUST_LOG")
            .output()
            .expect("spawn etp")
    }

    /// SIGTERM, then waits (drain deadline + 15 s at most) for the exit; returns the exit
    /// status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        self.proc.signal("TERM");
        let bound = Duration::from_secs(self.opts.drain_seconds + 15);
        let out = self.proc.wait_timeout(bound).unwrap_or_else(|| {
            panic!(
                "etp did not exit within {bound:?} of SIGTERM; log:\n{}",
                self.log_text()
            )
        });
        (out.status, t0.elapsed())
    }
}

/// `GET URL` with curl inside namespace `ns` (5 s at most): (HTTP code, body); code 0 when
/// nothing answered.
pub fn http_get(ns: &str, url: &str) -> (u16, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "5"])
        .args(["-w", "\n%{http_code}", url])
        .output()
        .expect("spawn curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The sum of the UDP `etp_flows_active` samples (UDP flows stay until their idle timeout).
fn sum_udp_active(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("etp_flows_active{") && l.contains("proto=\"udp\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Reads the final metrics (after open TCP flows closed), stops etp with SIGTERM and asserts
/// that it exited 0; returns the metrics.
pub fn stop_etp(mut etp: Etp) -> String {
    let m = etp.settled_metrics();
    let (status, _) = etp.terminate();
    assert!(
        status.success(),
        "etp exited with {status}; log:\n{}",
        etp.log_text()
    );
    m
}

/// The value of the sample `name{labels}` (0 when absent).
pub fn metric(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The sum of every sample whose line starts with `prefix`.
pub fn sum(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The Linkerd stand-in in `router`, as uid 2102; its per-connection lines go to `log`.
pub fn start_standin(router: &Netns, log: &TempFile) -> Proc {
    start_standin_with(router, log, &[], 2)
}

/// [`start_standin`] with more arguments (`--listen IP`, ...); waits for `listeners` sockets
/// on port 4140.
pub fn start_standin_with(
    router: &Netns,
    log: &TempFile,
    extra: &[&str],
    listeners: usize,
) -> Proc {
    // Writable by uid 2102; the stand-in appends and never creates it.
    run(Command::new("chmod").args(["666", log.as_str()]));
    let standin = example("linkerd-standin");
    let mut args = vec![
        "--reuid=2102",
        "--regid=2102",
        "--clear-groups",
        &standin,
        "--log",
        log.as_str(),
    ];
    args.extend_from_slice(extra);
    let p = router.spawn("setpriv", &args);
    wait_listening(router, "-Hltn", "sport = :4140", listeners);
    p
}

pub fn standin_lines(log: &TempFile) -> Vec<String> {
    std::fs::read_to_string(&log.path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `etp-testkit ARGS` in `ns`.
pub fn kit(ns: &Netns, args: &[&str]) -> Output {
    ns.cmd(&example("etp-testkit"))
        .args(args)
        .output()
        .expect("spawn etp-testkit")
}

/// Runs `etp-testkit ARGS` in `ns`, asserts success, returns stdout.
pub fn kit_ok(ns: &Netns, args: &[&str]) -> String {
    let out = kit(ns, args);
    assert!(
        out.status.success(),
        "etp-testkit {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn curl(ns: &Netns, url: &str) -> String {
    ns.exec("curl", &["-sS", "-g", "--max-time", "10", url])
        .trim()
        .to_string()
}

/// The original destinations `handoff_exchanges` connects to, one connection each.
pub const HANDOFF_DESTINATIONS: [&str; 7] = [
    "10.96.0.10:8080",
    "[fd00:10:96::a]:8080",
    "10.96.0.10:7001",
    "[fd00:10:96::a]:7001",
    "10.96.0.10:7002",
    "[fd00:10:96::a]:7002",
    "10.96.0.10:7003",
];

/// What a `linkerd` route for 10.96.0.10 / fd00:10:96::a must carry, from the client, through
/// whatever listens on the hand-off port (the stand-in or the real proxy): one connection to
/// each of `HANDOFF_DESTINATIONS`. Panics on the first exchange that fails.
pub fn handoff_exchanges(client: &Netns) {
    // HTTP, IPv4 and IPv6: the server's real answer names the original destination; it sees
    // the proxy's own connection from the router (10.10.2.1 / fd10:2::1).
    let body = curl(client, "http://10.96.0.10:8080/");
    assert!(
        body.starts_with("hello from 10.96.0.10:8080 to 10.10.2.1:"),
        "{body}"
    );
    let body = curl(client, "http://[fd00:10:96::a]:8080/");
    assert!(
        body.starts_with("hello from [fd00:10:96::a]:8080 to [fd10:2::1]:"),
        "{body}"
    );
    // A raw, non-HTTP exchange (the seed's `nc` check) passes unchanged.
    let raw = "\u{1}\u{2}not http at all\r\n\r\n\u{7f}";
    assert_eq!(kit_ok(client, &["echo", "10.96.0.10:7001", raw]), raw);
    assert_eq!(kit_ok(client, &["echo", "[fd00:10:96::a]:7001", raw]), raw);
    // Server speaks first: the banner arrives although the client sends nothing. (The real
    // proxy connects upstream only when protocol detection gives up: after its detect
    // timeout, 10 s by default.)
    for dst in ["10.96.0.10:7002", "[fd00:10:96::a]:7002"] {
        let b = kit_ok(client, &["banner", dst]);
        assert!(b.starts_with(&format!("banner from {dst}")), "{b}");
    }
    // Half-close: the client shuts its write side; the answer comes after the server's EOF.
    let up = kit_ok(client, &["upload", "10.96.0.10:7003", "100000"]);
    assert!(up.starts_with("ok len=100000"), "{up}");
}

/// `dig +short` against `server` (through etp); dig itself rejects replies from another source.
pub fn dig(ns: &Netns, server: &str) -> String {
    ns.exec(
        "dig",
        &[
            "+short",
            "+time=3",
            "+tries=1",
            &format!("@{server}"),
            "etp.test",
            "A",
        ],
    )
    .trim()
    .to_string()
}

/// Runs `f` on a new thread that has joined network namespace `ns` (setns affects only the
/// calling thread), so a test can open sockets there directly.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: setns(2) on a valid, open namespace fd; it changes only this thread's
        // network namespace, and the fd stays open for the duration of the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        f()
    })
}
