//! The pid file: written by `etp run` after READY, read by `etp reload` to send SIGHUP.
//!
//! Both ends distrust the file:
//! - writing never follows a symlink: the pid goes to a fresh temporary file in the same
//!   directory (`O_CREAT | O_EXCL | O_NOFOLLOW`), which is then renamed over the pid file's
//!   name (rename replaces a symlink, it does not write through it);
//! - reading accepts only a positive pid (`kill(-1)` signals every process the caller may
//!   signal, `kill(0)` the caller's own process group, a negative pid a whole group), and only
//!   a process whose command name is etp's: after a crash the pid may have been reused by an
//!   unrelated process, which SIGHUP would usually kill.
//!
//! The check and the signal are two steps; a pid freed and reused between them (microseconds)
//! is not covered. A pidfd (`pidfd_open` + `pidfd_send_signal`) would close that window, but
//! needs raw system calls, and etp keeps `unsafe` to its socket and netlink modules.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("reading the pid file {path} (is etp running?)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid file {path} holds {text:?}, not a process id")]
    NotAPid { path: PathBuf, text: String },
    #[error("pid file {path} holds {pid}: only a positive process id can be signalled")]
    NotPositive { path: PathBuf, pid: i64 },
    #[error("pid file {path} names pid {pid}, which is no longer running (stale pid file?)")]
    Gone { path: PathBuf, pid: i32 },
    #[error("pid file {path} names pid {pid}, which is {comm:?}, not etp (stale pid file?)")]
    NotEtp {
        path: PathBuf,
        pid: i32,
        comm: String,
    },
    #[error("sending SIGHUP to pid {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("writing the pid file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes this process's pid to `path` without following symlinks (temporary file + rename).
pub fn write(path: &Path) -> Result<(), PidFileError> {
    let err = |source| PidFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path.file_name().ok_or_else(|| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the pid file path names no file",
        ))
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A leftover (or planted) entry under the temporary name is removed, never followed:
    // unlink(2) removes a symlink itself.
    let _ = std::fs::remove_file(&tmp);
    let write_tmp = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        writeln!(f, "{}", std::process::id())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write_tmp().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Removes the pid file if it still names this process (a newer daemon's file is left alone).
pub fn remove_own(path: &Path) {
    let own = std::process::id().to_string();
    if std::fs::read_to_string(path).is_ok_and(|t| t.trim() == own) {
        let _ = std::fs::remove_file(path);
    }
}

/// Parses the pid file's text: one positive process id.
pub fn parse(path: &Path, text: &str) -> Result<i32, PidFileError> {
    let t = text.trim();
    let pid: i64 = t.parse().map_err(|_| PidFileError::NotAPid {
        path: path.to_path_buf(),
        text: t.chars().take(40).collect(),
    })?;
    match i32::try_from(pid) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PidFileError::NotPositive {
            path: path.to_path_buf(),
            pid,
        }),
    }
}

/// The command name (`/proc/PID/comm`) of `pid`; `None` when no such process runs.
fn comm(pid: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_string())
}

/// Whether a command name is etp's: "etp", or whatever this binary is called.
fn is_etp(name: &str) -> bool {
    name == "etp" || comm("self").is_some_and(|own| own == name)
}

/// Reads the pid file and sends SIGHUP to the etp daemon it names; returns the pid.
pub fn signal_reload(path: &Path) -> Result<i32, PidFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PidFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let pid = parse(path, &text)?;
    let Some(name) = comm(&pid.to_string()) else {
        return Err(PidFileError::Gone {
            path: path.to_path_buf(),
            pid,
        });
    };
    if !is_etp(&name) {
        return Err(PidFileError::NotEtp {
            path: path.to_path_buf(),
            pid,
            comm: name,
        });
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|source| PidFileError::Signal { pid, source })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("etp-pidfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_positive_pids_are_accepted() {
        let p = Path::new("/run/etp.pid");
        assert_eq!(parse(p, "1234\n").unwrap(), 1234);
        for bad in ["-1", "0", "-42", "99999999999"] {
            let e = parse(p, bad).unwrap_err();
            assert!(matches!(e, PidFileError::NotPositive { .. }), "{bad}: {e}");
        }
        for bad in ["", "12abc", "1 2", "0x10"] {
            assert!(matches!(
                parse(p, bad).unwrap_err(),
                PidFileError::NotAPid { .. }
            ));
        }
    }

    #[test]
    fn the_pid_file_is_not_written_through_a_symlink() {
        let dir = temp_dir("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("etp.pid");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        // A symlink planted under the temporary name is not followed either.
        let tmp = dir.join(format!(".etp.pid.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        assert!(!tmp.exists());
        remove_own(&path);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn another_processes_pid_file_is_not_removed() {
        let dir = temp_dir("other");
        let path = dir.join("etp.pid");
        std::fs::write(&path, "1\n").unwrap();
        remove_own(&path);
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
