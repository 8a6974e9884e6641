//! TLS on both legs of the gateway.
//!
//! Agent side: each agent gets its own CA, generated at activation and never written
//! anywhere but the CA certificate file the agent is pointed at. For a `CONNECT` to a
//! capability host the gateway presents a leaf certificate for that host signed by the
//! agent's CA, so HTTPS requests get the same L7 checks as plain HTTP ones.
//!
//! Upstream side: certificates are verified against the system roots plus any extra roots
//! the operator configures.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("reading CA certificates from {path}: {reason}")]
    Roots { path: String, reason: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One agent's interception CA and the leaf certificates minted from it, by host.
pub struct AgentCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl AgentCa {
    /// A fresh CA for `agent`, valid from a minute ago until `not_after`.
    pub fn generate(agent: &str, not_after: OffsetDateTime) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("enforcer gateway CA for {agent}"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "enforcer");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::minutes(1);
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(AgentCa {
            cert,
            key,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate the agent must trust, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server configuration presenting a certificate for `host` (DNS name or IP).
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        if let Ok(leaves) = self.leaves.lock()
            && let Some(config) = leaves.get(host)
        {
            return Ok(config.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = OffsetDateTime::now_utc() - Duration::minutes(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(7);
        let key = KeyPair::generate()?;
        let leaf = params.signed_by(&key, &self.cert, &self.key)?;
        let chain = vec![leaf.der().clone(), self.cert.der().clone()];
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, private)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if let Ok(mut leaves) = self.leaves.lock() {
            leaves.insert(host.to_owned(), config.clone());
        }
        Ok(config)
    }
}

/// The client configuration for upstream connections: system roots plus `extra_roots`
/// (PEM files).
pub fn upstream_client_config(
    extra_roots: &[&Path],
    use_system_roots: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if use_system_roots {
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system store may hold certificates rustls cannot use; skip those.
            let _ = roots.add(cert);
        }
    }
    for path in extra_roots {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| TlsError::Roots {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Roots {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Roots {
                path: path.display().to_string(),
                reason: "no certificates in the file".into(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::Roots {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        // Not an error: with no roots every upstream certificate is refused, which is
        // what a host without a CA store and without configured roots should get.
        tracing::warn!("no upstream root certificates: every https upstream will be refused");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_agent_ca() {
        let ca = AgentCa::generate("t", OffsetDateTime::now_utc() + Duration::hours(1)).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let a = ca.server_config("api.example.test").unwrap();
        let b = ca.server_config("api.example.test").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "leaf configs are cached per host");
        ca.server_config("127.0.0.1").unwrap();
    }

    #[test]
    fn extra_roots_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            upstream_client_config(&[&empty], false),
            Err(TlsError::Roots { .. })
        ));
        let ca = AgentCa::generate("t", OffsetDateTime::now_utc() + Duration::hours(1)).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert_pem()).unwrap();
        assert!(upstream_client_config(&[&good], false).is_ok());
        assert!(
            upstream_client_config(&[], false).is_ok(),
            "an empty store refuses every upstream; it does not fail start-up"
        );
    }
}
