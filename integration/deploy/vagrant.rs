//! The Vagrant end-to-end setup: ruby -c, bash -n, shellcheck, the paths its scripts use, and the
//! demo backend's Python.

use super::*;

#[test]
fn vagrant_files_parse_and_reference_what_exists() {
    let ruby = tool("ruby", "apt-get install -y ruby");
    let vagrantfile = repo().join("vagrant/Vagrantfile");
    let out = output(Command::new(ruby).arg("-c").arg(&vagrantfile));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Syntax OK"),
        "ruby -c Vagrantfile: {}",
        text(&out)
    );
    let vf = read("vagrant/Vagrantfile");
    assert!(
        vf.contains("config.vm.box = \"debian/bookworm64\""),
        "box is not Debian bookworm"
    );

    // Every provisioning script the Vagrantfile names exists, and in the order the e2e needs.
    let scripts: Vec<String> = vf
        .lines()
        .filter_map(|l| {
            l.split("path: \"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        scripts,
        [
            "scripts/install-k3s.sh",
            "scripts/install-linkerd.sh",
            "scripts/deploy-etp.sh",
            "scripts/deploy-demo.sh",
            "scripts/e2e-check.sh"
        ]
    );
    let bash = tool("bash", "apt-get install -y bash");
    let shellcheck = tool("shellcheck", "apt-get install -y shellcheck");
    for s in &scripts {
        let path = repo().join("vagrant").join(s);
        let out = output(Command::new(&bash).arg("-n").arg(&path));
        assert!(out.status.success(), "bash -n {s}: {}", text(&out));
        let out = output(Command::new(&shellcheck).arg(&path));
        assert!(out.status.success(), "shellcheck {s}: {}", text(&out));
        // Paths the scripts use inside the VM (/etp is the synced repository) exist here.
        for word in read(&format!("vagrant/{s}")).split(|c: char| c.is_whitespace() || c == '"') {
            if let Some(rel) = word.strip_prefix("/etp/") {
                let rel = rel.trim_end_matches(['\\', ';', ')', ',', '.']);
                if !rel.is_empty() {
                    assert!(
                        repo().join(rel).exists(),
                        "{s} uses /etp/{rel}, which is missing"
                    );
                }
            }
        }
    }

    // The demo backend's Python compiles.
    let cm = doc("vagrant/demo/backend.yaml", "ConfigMap", "backend");
    let dir = TempDir::new("backend");
    let py = dir.file(
        "backend.py",
        cm["data"]["backend.py"]
            .as_str()
            .expect("backend.py")
            .as_bytes(),
        0o644,
    );
    let python = tool("python3", "apt-get install -y python3");
    let out = output(Command::new(python).args(["-m", "py_compile"]).arg(&py));
    assert!(out.status.success(), "backend.py: {}", text(&out));
}
