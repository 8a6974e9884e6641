//! The control socket: a Unix socket only root, outside every agent cgroup, may use. One
//! JSON request per line, one JSON response per line, versioned.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Verify and activate a signed Envelope (its JSON text).
    Activate {
        envelope: String,
    },
    /// End an agent: its processes are killed, its cgroup, policy and gateway removed.
    Deactivate {
        agent: String,
    },
    /// One agent, or all.
    Status {
        agent: Option<String>,
    },
    Trip {
        agent: String,
    },
    Reset {
        agent: String,
    },
    Revoke {
        agent: String,
    },
    Approvals {
        agent: Option<String>,
    },
    Approve {
        agent: String,
        id: u64,
    },
    Deny {
        agent: String,
        id: u64,
    },
    /// Read the config file again: trust, floor, revocations and secrets change live, and
    /// running agents whose Envelope no longer verifies are cut off. With `dry_run`, only
    /// say what a reload would do.
    Reload {
        #[serde(default)]
        dry_run: bool,
    },
    Shutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stable machine-readable kind for errors (e.g. `replayed`, `unknown_agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub result: serde_json::Value,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            kind: None,
            result,
        }
    }

    pub fn err(kind: &str, error: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(error.into()),
            kind: Some(kind.to_owned()),
            result: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no enforcer daemon answers at {path} ({source}); start one with \
         `enforcer daemon --config /etc/enforcer/enforcer.toml` (as root)"
    )]
    NoDaemon {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon's answer could not be read: {0}")]
    Protocol(String),
    #[error("the daemon refused ({kind}): {error}")]
    Refused { kind: String, error: String },
    #[error(
        "the process answering at {path} runs as uid {uid}, not root: it is not the enforcer \
         daemon (check ENFORCER_CONTROL_SOCKET and --socket)"
    )]
    NotTheDaemon { path: PathBuf, uid: u32 },
}

/// Sends one request and returns the result of a successful response.
pub fn call(
    socket: &Path,
    op: Op,
    timeout: Option<Duration>,
) -> Result<serde_json::Value, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::NoDaemon {
        path: socket.to_owned(),
        source,
    })?;
    // `run` starts the agent in whatever cgroup the answer names: only root's word counts.
    let server = peer(&stream).map_err(io)?;
    if server.uid != 0 {
        return Err(ControlError::NotTheDaemon {
            path: socket.to_owned(),
            uid: server.uid,
        });
    }
    stream.set_read_timeout(timeout).map_err(io)?;
    let mut line = serde_json::to_vec(&Request {
        version: VERSION,
        op,
    })
    .map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| ControlError::Protocol(format!("{e}: {answer:?}")))?;
    if response.ok {
        Ok(response.result)
    } else {
        Err(ControlError::Refused {
            kind: response.kind.unwrap_or_else(|| "error".into()),
            error: response.error.unwrap_or_default(),
        })
    }
}

/// Who is on the other end of a control connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

/// The kernel's word on the connecting process (SO_PEERCRED), not anything it claims.
pub fn peer(stream: &impl std::os::fd::AsFd) -> std::io::Result<Peer> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(Peer {
        uid: creds.uid(),
        pid: creds.pid(),
    })
}

/// Refuses anyone but root, and root inside an agent cgroup (an agent that became root
/// must not reach the controls of its own confinement).
pub fn authorize(peer: Peer, agents_cgroup: &str) -> Result<(), String> {
    if peer.uid != 0 {
        return Err(format!("uid {} is not root", peer.uid));
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", peer.pid))
        .map_err(|e| format!("cannot read the cgroup of pid {}: {e}", peer.pid))?;
    let unified = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("");
    let parent = format!("/{}", agents_cgroup.trim_matches('/'));
    if unified == parent || unified.starts_with(&format!("{parent}/")) {
        return Err(format!(
            "pid {} runs in the agent cgroup {unified}",
            peer.pid
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_from_anyone_but_root_is_not_taken() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root and CI is set");
            eprintln!("skipped: needs root to run a listener as another user");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.path().join("control.sock");
        // An impostor as nobody, answering every request with a cgroup of its choice.
        let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.recv(65536)
c.sendall(b'{"ok":true,"result":{"cgroup":"/sys/fs/cgroup"}}\n')
"#;
        let mut impostor = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(script)
            .arg(&socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(impostor.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready.trim(), "ready", "the impostor did not start");
        let answer = call(
            &socket,
            Op::Status { agent: None },
            Some(Duration::from_secs(5)),
        );
        let _ = impostor.kill();
        let _ = impostor.wait();
        match answer {
            Err(ControlError::NotTheDaemon { uid: 65534, .. }) => {}
            other => panic!("took the impostor's answer: {other:?}"),
        }
    }

    #[test]
    fn requests_are_versioned_and_strict() {
        let text = serde_json::to_string(&Request {
            version: VERSION,
            op: Op::Trip { agent: "a".into() },
        })
        .unwrap();
        assert_eq!(text, r#"{"version":1,"op":"trip","agent":"a"}"#);
        assert!(
            serde_json::from_str::<Request>(r#"{"version":1,"op":"trip","agent":"a","x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"version":1,"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn non_root_peers_are_refused() {
        let me = Peer {
            uid: 1000,
            pid: std::process::id() as i32,
        };
        assert!(authorize(me, "enforcer").unwrap_err().contains("not root"));
        let root_here = Peer {
            uid: 0,
            pid: std::process::id() as i32,
        };
        // This test process is not in an agent cgroup named like this.
        assert!(authorize(root_here, "enforcer-no-such-parent-for-tests").is_ok());
    }
}
