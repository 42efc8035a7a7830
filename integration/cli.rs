//! The command line as users meet it: exit codes, help, render, check, config errors.
//! No privileges needed.

mod common;

use std::process::Command;

use common::{etp_bin, TempFile};

fn etp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(etp_bin())
        .args(args)
        .output()
        .expect("run etp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(format!("{}/rulesets/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn render_prints_the_golden_rulesets() {
    let example = format!("{}/deploy/etp.example.toml", env!("CARGO_MANIFEST_DIR"));
    let (code, out, err) = etp(&["render", "-c", &example]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, golden("example.nft"));
    let default = format!("{}/deploy/etp.default.toml", env!("CARGO_MANIFEST_DIR"));
    let (code, out, _) = etp(&["render", "--config", &default]);
    assert_eq!(code, 0);
    assert_eq!(out, golden("default.nft"));
}

#[test]
fn render_output_is_accepted_by_nft_check() {
    let (_, out, _) = etp(&[
        "render",
        "-c",
        &format!("{}/deploy/etp.example.toml", env!("CARGO_MANIFEST_DIR")),
    ]);
    let f = TempFile::new("render.nft", &out);
    // `nft -c` only checks; it changes nothing.
    let st = Command::new("nft").args(["-c", "-f", f.as_str()]).output();
    match st {
        Ok(o) => assert!(
            o.status.success(),
            "nft -c refused the render: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("nft is needed for this test (apt-get install nftables): {e}"),
    }
}

#[test]
fn check_summarises_and_bad_configs_exit_2_with_file_line_key() {
    let good = TempFile::new(
        "good.toml",
        "[[route]]\nname = \"web\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.96.0.0/12\"]\nports = [80]\naction = \"linkerd\"\n",
    );
    let (code, out, err) = etp(&["check", "-c", good.as_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is valid"), "{out}");
    assert!(
        out.contains("route 0 web: tcp -> linkerd (1 destinations, 1 port ranges)"),
        "{out}"
    );

    let bad = TempFile::new(
        "bad.toml",
        "[[route]]\nname = \"dns\"\nprotocols = [\"udp\"]\ndestinations = [\"10.96.0.10/32\"]\nports = [53]\naction = \"linkerd\"\n",
    );
    for cmd in ["check", "render", "apply", "audit", "run"] {
        let (code, out, err) = etp(&[cmd, "-c", bad.as_str()]);
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert!(
            err.contains(&format!(
                "{}:6: route[0].action: \"linkerd\" takes TCP only",
                bad.as_str()
            )),
            "{cmd}: {err}"
        );
    }
    let (code, _, err) = etp(&["check", "-c", "/nonexistent/etp.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("reading config /nonexistent/etp.toml: No such file"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2_and_every_subcommand_has_help() {
    let (code, _, err) = etp(&["--no-such-flag"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = etp(&["frobnicate"]);
    assert_eq!(code, 2);
    for cmd in [
        "run", "check", "render", "apply", "audit", "cleanup", "status", "reload",
    ] {
        let (code, out, _) = etp(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd} --help");
        assert!(out.contains("Usage: etp"), "{cmd}: {out}");
    }
    let (code, out, _) = etp(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Exit status: 0 ok, 1 runtime failure or drift, 2 bad usage or config"));
}

#[test]
fn the_port_flag_overrides_the_file_in_render() {
    let default = format!("{}/deploy/etp.default.toml", env!("CARGO_MANIFEST_DIR"));
    let (code, out, _) = etp(&["-port=16001", "render", "-c", &default]);
    assert_eq!(code, 0);
    assert!(out.contains("tproxy ip to :16001"), "{out}");
    assert!(!out.contains(":15001"));
}

#[test]
fn status_and_reload_without_a_daemon_fail_with_1() {
    let cfg = TempFile::new(
        "nodaemon.toml",
        "[admin]\naddress = \"127.0.0.1:1\"\n[daemon]\npid_file = \"/nonexistent/etp.pid\"\n",
    );
    let (code, _, err) = etp(&["status", "-c", cfg.as_str()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is etp running?"), "{err}");
    let (code, _, err) = etp(&["reload", "-c", cfg.as_str()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("reading the pid file /nonexistent/etp.pid"),
        "{err}"
    );
}

/// A stale pid file (etp crashed, the pid now belongs to an unrelated process) must not make
/// `etp reload` signal that process: SIGHUP would kill it.
#[test]
fn reload_does_not_signal_a_process_that_is_not_etp() {
    let mut victim = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let pid_file = TempFile::new("stale.pid", &format!("{}\n", victim.id()));
    let cfg = TempFile::new(
        "stale.toml",
        &format!(
            "[admin]\naddress = \"127.0.0.1:1\"\n[daemon]\npid_file = \"{}\"\n",
            pid_file.as_str()
        ),
    );
    let (code, _, err) = etp(&["reload", "-c", cfg.as_str()]);
    let alive = victim.try_wait().expect("try_wait").is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(alive, "etp reload signalled an unrelated process (sleep)");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not etp (stale pid file?)"), "{err}");
    // The same pid once its process is gone: a stale pid file, refused as such.
    let (code, _, err) = etp(&["reload", "-c", cfg.as_str()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("which is no longer running"), "{err}");
    // -1 would signal every process, 0 etp reload's own process group: both refused.
    for pid in ["-1", "0"] {
        std::fs::write(&pid_file.path, pid).expect("write pid file");
        let (code, _, err) = etp(&["reload", "-c", cfg.as_str()]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("only a positive process id"), "{err}");
    }
}
