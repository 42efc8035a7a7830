//! Deployment artifacts: the systemd unit, the Kubernetes manifests, the Dockerfile and the
//! Vagrant end-to-end setup, checked with the tools that judge them (systemd-analyze,
//! systemd-sysusers, kubernetes-validate, hadolint, ruby -c, bash -n, shellcheck), against each
//! other (ports, drain deadline, pid file, capabilities), and against the built binary: etp
//! applies its ruleset (and `etp run` relays TCP and DNS) as an unprivileged uid holding only
//! CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (no CAP_NET_RAW), in
//! the two ways the artifacts grant them (ambient capabilities as systemd does, file
//! capabilities under no_new_privs as the image and the pod do), and fails clearly without.
//!
//! A missing tool fails the test with the command that installs it: these checks are the only
//! thing standing between the artifacts and a broken deployment, so they are never skipped
//! (the capability tests need root for network namespaces and skip as the other suites do).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::Netns;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

static TMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Finds `prog` on PATH or fails the test with how to install it.
fn tool(prog: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(prog);
        if cand.is_file() {
            return cand;
        }
    }
    for dir in ["/usr/sbin", "/sbin"] {
        let cand = Path::new(dir).join(prog);
        if cand.is_file() {
            return cand;
        }
    }
    panic!("deploy tests need `{prog}`; install it with: {install}");
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory under the system temp dir, mode 0755 so that an unprivileged uid can reach
/// what is put in it; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = TMP_COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("etp-deploy-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(p)
    }

    /// Writes `name` with `contents` and `mode`; returns its path.
    fn file(&self, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every YAML document of a file, as JSON (PyYAML ships with kubernetes-validate).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let python = tool("python3", "apt-get install -y python3");
    let out = output(
        Command::new(python)
            .arg("-c")
            .arg(
                "import sys, json, yaml\n\
         print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
            )
            .arg(path),
    );
    assert!(
        out.status.success(),
        "parse YAML {} (PyYAML: pip install kubernetes-validate): {}",
        path.display(),
        text(&out)
    );
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(v) => v,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no manifests in {dir}");
    v
}

/// The one document of `kind` named `name` in a manifest file.
fn doc(path: &str, kind: &str, name: &str) -> Value {
    yaml_docs(&repo().join(path))
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{path} has no {kind} {name}"))
}

/// The etp.toml held by a ConfigMap manifest.
fn configmap_toml(path: &str) -> (String, toml::Table) {
    let cm = doc(path, "ConfigMap", "etp-config");
    let raw = cm["data"]["etp.toml"]
        .as_str()
        .unwrap_or_else(|| panic!("{path}: ConfigMap etp-config has no data.etp.toml"))
        .to_string();
    let table: toml::Table = raw
        .parse()
        .unwrap_or_else(|e| panic!("{path}: etp.toml is not TOML: {e}"));
    (raw, table)
}

fn int_at(t: &toml::Table, section: &str, key: &str) -> Option<i64> {
    t.get(section)?.get(key)?.as_integer()
}

fn str_at<'a>(t: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    t.get(section)?.get(key)?.as_str()
}

/// A systemd unit as section -> key -> values (a key may repeat).
fn parse_unit(src: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut units: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in src.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line without '=': {line}"));
        units
            .entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    units
}

fn words(values: &[String]) -> BTreeSet<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(str::to_string)
        .collect()
}

/// The unit with /usr/local/bin/etp replaced by the binary cargo built, in a temp dir, under
/// its own name (systemd-analyze derives the unit name from the file name).
fn unit_copy(dir: &TempDir, edit: impl Fn(String) -> String) -> PathBuf {
    let src = read("deploy/systemd/etp.service");
    let bin = common::etp_bin();
    let unit = edit(src.replace("/usr/local/bin/etp", bin.to_str().expect("utf-8 path")));
    dir.file("etp.service", unit.as_bytes(), 0o644)
}

#[path = "deploy/caps.rs"]
mod caps;
#[path = "deploy/docker.rs"]
mod docker;
#[path = "deploy/kubernetes.rs"]
mod kubernetes;
#[path = "deploy/systemd.rs"]
mod systemd;
#[path = "deploy/vagrant.rs"]
mod vagrant;
