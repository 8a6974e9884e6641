//! The daemon's configuration: read at start-up and validated whole before anything is
//! bound, mounted or attached. A bad config exits with an error that names the field, the
//! file and the fix. `enforcer reload` reads it again: trust, floor, revocations, clock
//! skew, lifetime and secrets are taken up live ([`Grants`]); the rest needs a restart.
use std::{
    net::IpAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    envelope::{
        Floor, Keyring, Revocations, SystemClock, Verifier, VerifyOptions, load_signing_key,
    },
    gateway::secrets::SecretStore,
};

/// The default location of the daemon's configuration.
pub const DEFAULT_CONFIG: &str = "/etc/enforcer/enforcer.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Budgets, breaker states, used Envelope ids and agent records survive restarts here.
    pub state_dir: PathBuf,
    /// The audit log's directory.
    pub audit_dir: PathBuf,
    /// The daemon's ed25519 key (PKCS#8 PEM, mode 0600) that signs audit checkpoints.
    pub audit_key: PathBuf,
    /// Directory of trusted Envelope issuer keys (*.pub).
    pub trust_dir: PathBuf,
    /// The secret store: a directory of files or one `name = value` file, root-only.
    pub secrets: PathBuf,
    /// Host policy floor every Envelope inherits (TOML).
    #[serde(default)]
    pub floor: Option<PathBuf>,
    /// Revoked Envelope ids and key ids (`envelope <id>` / `key <id>` lines).
    #[serde(default)]
    pub revocations: Option<PathBuf>,
    /// The control socket; only root outside every agent cgroup may use it.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// The address agents' gateways listen on.
    #[serde(default = "default_gateway_ip")]
    pub gateway_ip: IpAddr,
    /// The first and last port gateways may use.
    #[serde(default = "default_gateway_ports")]
    pub gateway_ports: [u16; 2],
    /// bpffs directory of the pinned programs and maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Parent cgroup of all agents, relative to the cgroup v2 mount.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    /// Prometheus metrics (text format) for operators; absent: no metrics listener.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Extra PEM roots for upstream TLS (besides the system store).
    #[serde(default)]
    pub upstream_roots: Vec<PathBuf>,
    /// Trust only `upstream_roots` for upstream TLS.
    #[serde(default)]
    pub no_system_roots: bool,
    /// Let gateways dial a capability's host name at an internal address (loopback,
    /// private, link-local, …), which they otherwise refuse.
    #[serde(default)]
    pub allow_internal_upstreams: bool,
    /// How far issuers' clocks may disagree with this host's, in seconds.
    #[serde(default = "default_skew")]
    pub clock_skew_secs: u32,
    /// The longest Envelope lifetime this host accepts, in seconds.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_secs: u32,
    /// Seconds in-flight requests get to finish on SIGTERM.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/enforcer/control.sock")
}
fn default_gateway_ip() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_gateway_ports() -> [u16; 2] {
    [18_000, 18_999]
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from(crate::kernel::DEFAULT_PIN_DIR)
}
fn default_cgroup_parent() -> String {
    crate::sandbox::DEFAULT_CGROUP_PARENT.into()
}
fn default_skew() -> u32 {
    60
}
fn default_max_lifetime() -> u32 {
    24 * 3600
}
fn default_grace() -> u64 {
    5
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the daemon config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("daemon config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("daemon config {path}: `{field}` = {value}: {problem}")]
    Field {
        path: PathBuf,
        field: &'static str,
        value: String,
        problem: String,
    },
}

/// A validated configuration with everything it names loaded.
pub struct Loaded {
    pub config: DaemonConfig,
    pub path: PathBuf,
    pub grants: Grants,
    pub audit_key: ed25519_dalek::SigningKey,
}

/// How Envelopes are judged and where credentials come from: the part of the config a
/// running daemon can take up again (`enforcer reload`) without a restart.
pub struct Grants {
    pub verifier: Verifier,
    pub secrets: SecretStore,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("config", &self.config)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DaemonConfig {
    /// The fields a running daemon cannot take up again: they name its files, sockets,
    /// addresses, kernel state and agent user. Returns those that differ in `new`.
    pub fn fixed_fields_changed(&self, new: &DaemonConfig) -> Vec<&'static str> {
        // Spelled out whole, so a new field does not compile until it is sorted here.
        let DaemonConfig {
            state_dir,
            audit_dir,
            audit_key,
            trust_dir: _,
            secrets: _,
            floor: _,
            revocations: _,
            control_socket,
            gateway_ip,
            gateway_ports,
            pin_dir,
            cgroup_parent,
            metrics_listen,
            upstream_roots,
            no_system_roots,
            allow_internal_upstreams,
            clock_skew_secs: _,
            max_lifetime_secs: _,
            shutdown_grace_secs,
        } = self;
        [
            ("state_dir", *state_dir == new.state_dir),
            ("audit_dir", *audit_dir == new.audit_dir),
            ("audit_key", *audit_key == new.audit_key),
            ("control_socket", *control_socket == new.control_socket),
            ("gateway_ip", *gateway_ip == new.gateway_ip),
            ("gateway_ports", *gateway_ports == new.gateway_ports),
            ("pin_dir", *pin_dir == new.pin_dir),
            ("cgroup_parent", *cgroup_parent == new.cgroup_parent),
            ("metrics_listen", *metrics_listen == new.metrics_listen),
            ("upstream_roots", *upstream_roots == new.upstream_roots),
            ("no_system_roots", *no_system_roots == new.no_system_roots),
            (
                "allow_internal_upstreams",
                *allow_internal_upstreams == new.allow_internal_upstreams,
            ),
            (
                "shutdown_grace_secs",
                *shutdown_grace_secs == new.shutdown_grace_secs,
            ),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect()
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads and validates the config and loads every file it names.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(path, &text)?;
        config.validate(path)
    }

    fn validate(self, path: &Path) -> Result<Loaded, ConfigError> {
        let field = |field: &'static str, value: &dyn std::fmt::Display, problem: String| {
            ConfigError::Field {
                path: path.to_owned(),
                field,
                value: format!("'{value}'"),
                problem,
            }
        };
        for (name, dir) in [
            ("state_dir", &self.state_dir),
            ("audit_dir", &self.audit_dir),
        ] {
            if !dir.is_absolute() {
                return Err(field(name, &dir.display(), "give an absolute path".into()));
            }
            if let Ok(meta) = std::fs::metadata(dir) {
                if !meta.is_dir() {
                    return Err(field(
                        name,
                        &dir.display(),
                        "exists and is not a directory".into(),
                    ));
                }
                if meta.permissions().mode() & 0o022 != 0 {
                    return Err(field(
                        name,
                        &dir.display(),
                        "is writable by group or others; `chmod go-w` it".into(),
                    ));
                }
            }
        }
        if self.gateway_ports[0] == 0 || self.gateway_ports[0] > self.gateway_ports[1] {
            return Err(field(
                "gateway_ports",
                &format!("{:?}", self.gateway_ports),
                "give [first, last] with 0 < first <= last".into(),
            ));
        }
        if self.gateway_ip.is_unspecified() {
            return Err(field(
                "gateway_ip",
                &self.gateway_ip,
                "give a concrete address the agents can reach, e.g. 127.0.0.1".into(),
            ));
        }
        crate::sandbox::CgroupParent::locate(&self.cgroup_parent)
            .map_err(|e| field("cgroup_parent", &self.cgroup_parent, e.to_string()))?;
        let keyring = Keyring::load_dir(&self.trust_dir)
            .map_err(|e| field("trust_dir", &self.trust_dir.display(), e.to_string()))?;
        if keyring.is_empty() {
            return Err(field(
                "trust_dir",
                &self.trust_dir.display(),
                "holds no trusted issuer key (*.pub)".into(),
            ));
        }
        let mut verifier = Verifier::new(keyring)
            .with_options(VerifyOptions {
                clock_skew: time::Duration::seconds(i64::from(self.clock_skew_secs)),
                max_lifetime: time::Duration::seconds(i64::from(self.max_lifetime_secs)),
                ..VerifyOptions::default()
            })
            .with_clock(std::sync::Arc::new(SystemClock));
        if let Some(floor) = &self.floor {
            verifier = verifier.with_floor(
                Floor::load(floor).map_err(|e| field("floor", &floor.display(), e.to_string()))?,
            );
        }
        if let Some(rev) = &self.revocations {
            verifier = verifier.with_revocations(
                Revocations::load(rev)
                    .map_err(|e| field("revocations", &rev.display(), e.to_string()))?,
            );
        }
        let secrets = SecretStore::load(&self.secrets, true)
            .map_err(|e| field("secrets", &self.secrets.display(), e.to_string()))?;
        let audit_key = load_signing_key(&self.audit_key)
            .map_err(|e| field("audit_key", &self.audit_key.display(), e.to_string()))?;
        if let Ok(meta) = std::fs::metadata(&self.audit_key)
            && meta.uid() != 0
            && nix::unistd::geteuid().is_root()
        {
            return Err(field(
                "audit_key",
                &self.audit_key.display(),
                "is not owned by root; `chown root` it".into(),
            ));
        }
        for root in &self.upstream_roots {
            if !root.is_file() {
                return Err(field(
                    "upstream_roots",
                    &root.display(),
                    "is not a file of PEM certificates".into(),
                ));
            }
        }
        Ok(Loaded {
            config: self,
            path: path.to_owned(),
            grants: Grants { verifier, secrets },
            audit_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses() {
        let text = include_str!("../../../dist/enforcer.toml");
        let cfg = DaemonConfig::parse(Path::new("dist/enforcer.toml"), text).unwrap();
        assert_eq!(cfg.gateway_ports, [18000, 18999]);
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9310".parse().unwrap()));
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let p = Path::new("/etc/enforcer/enforcer.toml");
        let err = DaemonConfig::parse(p, "state_dir = '/s'\naudit_dir = '/a'\naudit_key = '/k'\ntrust_dir = '/t'\nsecrets = '/x'\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bogus") && err.contains("enforcer.toml"),
            "{err}"
        );
        let err = DaemonConfig::parse(p, "state_dir = '/s'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("audit_dir"), "{err}");
        let cfg = DaemonConfig::parse(
            p,
            "state_dir = 'relative'\naudit_dir = '/a'\naudit_key = '/k'\ntrust_dir = '/t'\nsecrets = '/x'\n",
        )
        .unwrap();
        let err = cfg.validate(p).unwrap_err().to_string();
        assert!(
            err.contains("`state_dir`") && err.contains("absolute"),
            "{err}"
        );
        let cfg = DaemonConfig::parse(
            p,
            "state_dir = '/s'\naudit_dir = '/a'\naudit_key = '/k'\ntrust_dir = '/t'\nsecrets = '/x'\ngateway_ports = [9, 1]\n",
        )
        .unwrap();
        assert!(
            cfg.validate(p)
                .unwrap_err()
                .to_string()
                .contains("gateway_ports")
        );
    }

    #[test]
    fn a_reload_may_change_how_envelopes_are_judged_but_nothing_else() {
        let p = Path::new("dist/enforcer.toml");
        let text = include_str!("../../../dist/enforcer.toml");
        let base = DaemonConfig::parse(p, text).unwrap();
        let live = DaemonConfig::parse(
            p,
            &format!("{text}\nrevocations = '/etc/enforcer/revoked'\n")
                .replace("clock_skew_secs = 60", "clock_skew_secs = 5")
                .replace("max_lifetime_secs = 86400", "max_lifetime_secs = 60")
                .replace("trusted-issuers", "issuers-2026")
                .replace("/etc/enforcer/secrets", "/etc/enforcer/secrets-2")
                .replace("floor.toml", "floor-strict.toml"),
        )
        .unwrap();
        assert!(base.fixed_fields_changed(&live).is_empty());
        let fixed = DaemonConfig::parse(
            p,
            &text
                .replace("[18000, 18999]", "[19000, 19999]")
                .replace("/sys/fs/bpf/enforcer", "/sys/fs/bpf/other"),
        )
        .unwrap();
        assert_eq!(
            base.fixed_fields_changed(&fixed),
            ["gateway_ports", "pin_dir"]
        );
    }
}
