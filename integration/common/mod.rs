//! Network-namespace harness shared by the integration tests.
//!
//! Every namespace gets a unique name (`etpt-<pid>-<n>-<tag>`) and is deleted by `Drop`, so a
//! failing test leaves nothing behind. Processes started in a namespace are killed by `Drop` too.
//! Tests use `ip` and `nft` only as independent witnesses and for setup; etp itself never
//! runs them.
#![allow(dead_code)]

pub mod linkerd_proxy;
pub mod load;
pub mod topo;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Skips the calling test (returns early) when not root: namespaces need CAP_SYS_ADMIN.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
    };
}

pub fn is_root() -> bool {
    // SAFETY-free: read the effective uid from /proc instead of calling geteuid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Path of the etp binary cargo built for this test run.
pub fn etp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_etp"))
}

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn sh(line: &str) -> String {
    String::from_utf8_lossy(&run(Command::new("sh").arg("-c").arg(line)).stdout).into_owned()
}

/// A network namespace that is deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("etpt-{}-{n}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A `Command` that runs `prog` inside this namespace.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Runs `prog args` in the namespace; panics on failure; returns stdout.
    pub fn exec(&self, prog: &str, args: &[&str]) -> String {
        String::from_utf8_lossy(&run(self.cmd(prog).args(args)).stdout).into_owned()
    }

    /// Runs `prog args` in the namespace and returns the raw output, failing or not.
    pub fn try_exec(&self, prog: &str, args: &[&str]) -> Output {
        self.cmd(prog)
            .args(args)
            .output()
            .expect("spawn ip netns exec")
    }

    pub fn ip(&self, args: &[&str]) -> String {
        self.exec("ip", args)
    }

    pub fn nft(&self, args: &[&str]) -> String {
        self.exec("nft", args)
    }

    /// A shell line run in the namespace.
    pub fn sh(&self, line: &str) -> String {
        self.exec("sh", &["-c", line])
    }

    /// Starts a long-running process in the namespace; killed when the guard drops.
    pub fn spawn(&self, prog: &str, args: &[&str]) -> Proc {
        let child = self
            .cmd(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
        Proc { child: Some(child) }
    }

    /// Enables forwarding for IPv4 and IPv6 in this namespace (a router).
    pub fn forwarding(&self) {
        self.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        self.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running in the namespace, then delete it.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair between two namespaces with IPv4 and IPv6 addresses on both ends.
/// `a_addrs` / `b_addrs` are CIDR strings like "10.1.0.1/24", "fd01::1/64".
pub fn link(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    // Create in `a`, move the peer into `b`: names only need to be unique per namespace.
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args);
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal by name (e.g. "HUP", "TERM").
    pub fn signal(&self, sig: &str) {
        run(Command::new("kill").args(["-s", sig, &self.pid().to_string()]));
    }

    /// Waits for exit up to `timeout`; returns the output if it exited.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Output> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(_)) = child.try_wait() {
                return self.child.take().and_then(|c| c.wait_with_output().ok());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and returns what it printed.
    pub fn kill_output(&mut self) -> Output {
        let mut child = self.child.take().expect("process already taken");
        let _ = child.kill();
        child.wait_with_output().expect("reap child")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `text` to a fresh temp file and returns its path (removed on drop).
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, text: &str) -> TempFile {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("etpt-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp file");
        TempFile { path }
    }

    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
