//! Issuer keys: ed25519 key files and the keyring of trusted public keys.
//!
//! - private key: PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`, RFC 8410), mode 0600, refused
//!   when group or world can read or write it;
//! - public key: PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`), the form
//!   `openssl pkey -pubout` writes;
//! - key id: lowercase hex SHA-256 of the raw 32-byte public key.
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{
        DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey,
        spki::der::pem::LineEnding,
    },
};
use sha2::{Digest, Sha256};

/// Key files are tiny; anything bigger is not one.
const MAX_KEY_FILE: u64 = 16 * 1024;
/// More trusted keys than this in one directory is a mistake, not rotation.
pub const MAX_TRUSTED_KEYS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} already exists; refusing to overwrite a key (choose another prefix or remove it first)"
    )]
    Exists { path: PathBuf },
    #[error(
        "{path} is readable or writable by group or others (mode {mode:04o}); a private key must be \
         mode 0600 or stricter — run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "{path} is writable by group or others (mode {mode:04o}); anyone who can write there can \
         add a trusted key — run `chmod go-w {path}`"
    )]
    TrustWritable { path: PathBuf, mode: u32 },
    #[error(
        "{path} is owned by uid {uid}, not root: its owner could add a trusted key — run `chown root {path}`"
    )]
    TrustOwner { path: PathBuf, uid: u32 },
    #[error("{path}: not a {what}: {reason}")]
    Format {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{path}: the trust directory holds no .pub keys")]
    NoKeys { path: PathBuf },
    #[error("{path}: more than {MAX_TRUSTED_KEYS} keys")]
    TooManyKeys { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Lowercase hex SHA-256 of the raw 32-byte public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Paths `PREFIX.key` and `PREFIX.pub`.
pub fn key_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let mut k = prefix.as_os_str().to_owned();
    k.push(".key");
    let mut p = prefix.as_os_str().to_owned();
    p.push(".pub");
    (PathBuf::from(k), PathBuf::from(p))
}

fn create_new(path: &Path, mode: u32) -> Result<File, KeyError> {
    // O_EXCL + mode at creation: the file never exists with wider permissions, not even
    // for an instant, and an existing file (or symlink) is never followed or replaced.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                KeyError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })
}

/// Generates a key pair and writes `PREFIX.key` (0600) and `PREFIX.pub` (0644). Refuses to
/// overwrite either. Returns the key id.
pub fn generate_keypair(prefix: &Path) -> Result<String, KeyError> {
    let (key_path, pub_path) = key_paths(prefix);
    let signing = SigningKey::generate(&mut rand::rngs::OsRng);
    let verifying = signing.verifying_key();
    let key_pem = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Format {
            path: key_path.clone(),
            what: "PKCS#8 private key",
            reason: e.to_string(),
        })?;
    let pub_pem = verifying
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Format {
            path: pub_path.clone(),
            what: "public key",
            reason: e.to_string(),
        })?;
    let mut key_file = create_new(&key_path, 0o600)?;
    let mut pub_file = match create_new(&pub_path, 0o644) {
        Ok(f) => f,
        Err(e) => {
            drop(key_file);
            let _ = std::fs::remove_file(&key_path);
            return Err(e);
        }
    };
    let written = key_file
        .write_all(key_pem.as_bytes())
        .and_then(|()| key_file.sync_all())
        .map_err(io_err(&key_path))
        .and_then(|()| {
            pub_file
                .write_all(pub_pem.as_bytes())
                .and_then(|()| pub_file.sync_all())
                .map_err(io_err(&pub_path))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&key_path);
        let _ = std::fs::remove_file(&pub_path);
        return Err(e);
    }
    Ok(key_id(&verifying))
}

fn read_small(file: &mut File, path: &Path) -> Result<String, KeyError> {
    let mut text = String::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io_err(path))?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(KeyError::Format {
            path: path.to_owned(),
            what: "key file",
            reason: format!("larger than {MAX_KEY_FILE} bytes"),
        });
    }
    Ok(text)
}

/// Loads a private key, refusing it when group or others have any access.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    // Check the opened file, not the path, so a swap between check and read is harmless.
    let meta = file.metadata().map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if !meta.is_file() {
        return Err(KeyError::Format {
            path: path.to_owned(),
            what: "private key",
            reason: "not a regular file".into(),
        });
    }
    let text = read_small(&mut file, path)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Format {
        path: path.to_owned(),
        what: "PEM PKCS#8 ed25519 private key",
        reason: e.to_string(),
    })
}

/// Loads a public key file (PEM SubjectPublicKeyInfo).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let text = read_small(&mut file, path)?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::Format {
        path: path.to_owned(),
        what: "PEM ed25519 public key",
        reason: e.to_string(),
    })
}

/// Trusted issuer keys by key id. Several may be trusted at once so keys can rotate: add
/// the new key, issue with it, then remove (or revoke) the old one.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<String, VerifyingKey>,
}

impl Keyring {
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Adds a key and returns its id.
    pub fn add(&mut self, key: VerifyingKey) -> String {
        let id = key_id(&key);
        self.keys.insert(id.clone(), key);
        id
    }

    pub fn get(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys.get(key_id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Loads every `*.pub` file of a directory. The directory and the files must not be
    /// writable by group or others: whoever can write there decides what is trusted.
    pub fn load_dir(dir: &Path) -> Result<Keyring, KeyError> {
        let writable = |path: &Path| -> Result<(), KeyError> {
            let meta = std::fs::metadata(path).map_err(io_err(path))?;
            let mode = meta.mode() & 0o7777;
            if mode & 0o022 != 0 {
                return Err(KeyError::TrustWritable {
                    path: path.to_owned(),
                    mode,
                });
            }
            // Run by root (the daemon), another owner could chmod it writable again.
            if meta.uid() != 0 && nix::unistd::geteuid().is_root() {
                return Err(KeyError::TrustOwner {
                    path: path.to_owned(),
                    uid: meta.uid(),
                });
            }
            Ok(())
        };
        writable(dir)?;
        let mut ring = Keyring::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            .collect();
        entries.sort();
        for path in entries {
            if ring.len() >= MAX_TRUSTED_KEYS {
                return Err(KeyError::TooManyKeys {
                    path: dir.to_owned(),
                });
            }
            writable(&path)?;
            ring.add(load_verifying_key(&path)?);
        }
        if ring.is_empty() {
            return Err(KeyError::NoKeys {
                path: dir.to_owned(),
            });
        }
        Ok(ring)
    }
}
