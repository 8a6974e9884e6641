//! The credentials the gateway injects. They live only in this process: read from a
//! root-only store, never logged, never in errors, never in `Debug` output, never sent to
//! the agent.
use std::{
    collections::HashMap,
    fmt, fs, io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// A secret value. Its `Debug` and `Display` print a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for injection and scrubbing only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value and the encodings an upstream may echo it in: hex in either case, base64
    /// and base64url, percent-encoding. A value inside a longer base64 string (a Basic
    /// `user:secret`, a token) is encoded at one of three alignments; for each, only the
    /// characters the value alone decides are kept, and they appear whatever surrounds it.
    /// Encoded forms shorter than [`MIN_ECHO_FORM`] are left out: they would match by chance.
    pub fn echo_forms(&self) -> Vec<Secret> {
        use base64::{
            Engine as _,
            engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD},
        };
        use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
        // RFC 3986's unreserved characters stay as they are in most encoders' output.
        const UNRESERVED_KEPT: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        let raw = self.0.as_bytes();
        let mut encoded = vec![hex::encode(raw), hex::encode_upper(raw)];
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            for offset in 0..3 {
                let mut aligned = vec![0u8; offset];
                aligned.extend_from_slice(raw);
                let text = engine.encode(&aligned);
                // Character i holds bits 6i..6i+6; the value's are 8·offset..8·(offset+len).
                let first = (8 * offset).div_ceil(6);
                let end = 8 * (offset + raw.len()) / 6;
                if let Some(core) = text.get(first..end) {
                    encoded.push(core.to_owned());
                }
            }
        }
        encoded.push(utf8_percent_encode(&self.0, NON_ALPHANUMERIC).to_string());
        encoded.push(utf8_percent_encode(&self.0, UNRESERVED_KEPT).to_string());
        // Inside a JSON string: quotes, backslashes and control characters escaped, and
        // '/' as "\/" the way some encoders write it.
        if let Ok(quoted) = serde_json::to_string(&self.0)
            && let Some(inner) = quoted.get(1..quoted.len() - 1)
        {
            encoded.push(inner.to_owned());
            encoded.push(inner.replace('/', "\\/"));
        }
        let mut forms = vec![self.clone()];
        for form in encoded {
            if form.len() >= MIN_ECHO_FORM && !forms.iter().any(|f| f.0 == form) {
                forms.push(Secret(form));
            }
        }
        forms
    }
}

/// The shortest encoded form of a secret that is scrubbed from responses.
pub const MIN_ECHO_FORM: usize = 8;

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "secret store {path} is readable or writable by group or others (mode {mode:o}); \
         make it root-only with `chmod 600` (files) or `chmod 700` (directories)"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("secret store {path} is owned by uid {uid}, not root; `chown root` it")]
    NotRootOwned { path: PathBuf, uid: u32 },
    #[error("secret store {path}: line {line} is not `name = value`")]
    BadLine { path: PathBuf, line: usize },
    #[error("secret name {name:?} in {path} is invalid: use A-Z, a-z, 0-9, '-', '_', '.'")]
    BadName { path: PathBuf, name: String },
    #[error("secret {name:?} in {path} is empty")]
    Empty { path: PathBuf, name: String },
    #[error("no secret named {0:?} in the store")]
    Missing(String),
}

/// Secrets by name. A store is either a directory with one file per secret (the file name
/// is the secret's name, its content, without a trailing newline, the value), or a single
/// file of `name = value` lines (`#` starts a comment).
#[derive(Clone, Default)]
pub struct SecretStore {
    secrets: HashMap<String, Secret>,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.secrets.keys().collect();
        names.sort();
        f.debug_struct("SecretStore")
            .field("names", &names)
            .finish()
    }
}

impl SecretStore {
    /// Loads a store, refusing it when anyone but its owner could read or change it, or,
    /// with `require_root_owner`, when root does not own it.
    pub fn load(path: &Path, require_root_owner: bool) -> Result<Self, SecretError> {
        let meta = fs::metadata(path).map_err(|source| SecretError::Io {
            path: path.to_owned(),
            source,
        })?;
        check_private(path, &meta, require_root_owner)?;
        let mut secrets = HashMap::new();
        if meta.is_dir() {
            let entries = fs::read_dir(path).map_err(|source| SecretError::Io {
                path: path.to_owned(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| SecretError::Io {
                    path: path.to_owned(),
                    source,
                })?;
                let file = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let meta = fs::metadata(&file).map_err(|source| SecretError::Io {
                    path: file.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    continue;
                }
                check_private(&file, &meta, require_root_owner)?;
                validate_name(&file, &name)?;
                let value = fs::read_to_string(&file).map_err(|source| SecretError::Io {
                    path: file.clone(),
                    source,
                })?;
                let value = value.strip_suffix('\n').unwrap_or(&value).to_owned();
                if value.is_empty() {
                    return Err(SecretError::Empty { path: file, name });
                }
                secrets.insert(name, Secret(value));
            }
        } else {
            let text = fs::read_to_string(path).map_err(|source| SecretError::Io {
                path: path.to_owned(),
                source,
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (name, value) = line.split_once('=').ok_or(SecretError::BadLine {
                    path: path.to_owned(),
                    line: i + 1,
                })?;
                let (name, value) = (name.trim(), value.trim());
                validate_name(path, name)?;
                if value.is_empty() {
                    return Err(SecretError::Empty {
                        path: path.to_owned(),
                        name: name.to_owned(),
                    });
                }
                secrets.insert(name.to_owned(), Secret(value.to_owned()));
            }
        }
        Ok(SecretStore { secrets })
    }

    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        SecretStore {
            secrets: pairs.into_iter().map(|(k, v)| (k, Secret(v))).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Result<&Secret, SecretError> {
        self.secrets
            .get(name)
            .ok_or_else(|| SecretError::Missing(name.to_owned()))
    }

    /// Every value, for scrubbing echoes out of responses.
    pub fn values(&self) -> impl Iterator<Item = &Secret> {
        self.secrets.values()
    }
}

fn check_private(
    path: &Path,
    meta: &fs::Metadata,
    require_root_owner: bool,
) -> Result<(), SecretError> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    if require_root_owner && meta.uid() != 0 {
        return Err(SecretError::NotRootOwned {
            path: path.to_owned(),
            uid: meta.uid(),
        });
    }
    Ok(())
}

fn validate_name(path: &Path, name: &str) -> Result<(), SecretError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SecretError::BadName {
            path: path.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_of_a_value_inside_a_longer_one_contains_one_of_its_echo_forms() {
        use base64::{
            Engine as _,
            engine::general_purpose::{STANDARD, URL_SAFE},
        };
        let secret = Secret::new("sk-live-4f1d?2e9c/+");
        let forms: Vec<String> = secret
            .echo_forms()
            .iter()
            .map(|f| f.expose().to_owned())
            .collect();
        let found = |text: &str| forms.iter().any(|f| text.contains(f.as_str()));
        for prefix in ["", "a", "ab", "user:", "Bearer x"] {
            for suffix in ["", "z", "zz", "&more"] {
                let whole = format!("{prefix}{}{suffix}", secret.expose());
                for text in [STANDARD.encode(&whole), URL_SAFE.encode(&whole)] {
                    assert!(found(&text), "{prefix:?}+{suffix:?}: {text}");
                }
            }
        }
        assert!(found(&hex::encode(secret.expose())));
        assert!(found(&hex::encode_upper(secret.expose())));
        assert!(found("sk-live-4f1d%3F2e9c%2F%2B"));
        assert!(found("sk%2Dlive%2D4f1d%3F2e9c%2F%2B"));
        assert!(found(r#"{"key":"sk-live-4f1d?2e9c\/+"}"#));
        let quoted = Secret::new("pa\"ss/wo\\rd\n");
        let forms: Vec<String> = quoted
            .echo_forms()
            .iter()
            .map(|f| f.expose().to_owned())
            .collect();
        for echoed in [
            serde_json::to_string(quoted.expose()).unwrap(),
            serde_json::to_string(quoted.expose())
                .unwrap()
                .replace('/', "\\/"),
        ] {
            assert!(
                forms.iter().any(|f| echoed.contains(f.as_str())),
                "{echoed}"
            );
        }
        // A short value's encodings would match anything; only the value itself is kept.
        assert_eq!(Secret::new("abc").echo_forms().len(), 1);
    }

    fn write(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn loads_a_directory_and_a_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        write(&dir.path().join("exchange-key"), "s3cr3t\n", 0o600);
        let store = SecretStore::load(dir.path(), false).unwrap();
        assert_eq!(store.get("exchange-key").unwrap().expose(), "s3cr3t");
        assert!(matches!(store.get("other"), Err(SecretError::Missing(_))));

        let file = dir.path().join("secrets.conf");
        write(&file, "# comment\na = 1\nb.c=two words\n", 0o600);
        let store = SecretStore::load(&file, false).unwrap();
        assert_eq!(store.get("b.c").unwrap().expose(), "two words");
    }

    #[test]
    fn refuses_open_permissions_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        write(&file, "a = 1\n", 0o640);
        assert!(matches!(
            SecretStore::load(&file, false),
            Err(SecretError::TooOpen { .. })
        ));
        write(&file, "a = 1\n", 0o604);
        assert!(matches!(
            SecretStore::load(&file, false),
            Err(SecretError::TooOpen { .. })
        ));
        write(&file, "novalue\n", 0o600);
        assert!(matches!(
            SecretStore::load(&file, false),
            Err(SecretError::BadLine { line: 1, .. })
        ));
        write(&file, "bad name = 1\n", 0o600);
        assert!(matches!(
            SecretStore::load(&file, false),
            Err(SecretError::BadName { .. })
        ));
        // One open file inside a private directory is refused too.
        let store_dir = dir.path().join("store");
        fs::create_dir(&store_dir).unwrap();
        fs::set_permissions(&store_dir, fs::Permissions::from_mode(0o700)).unwrap();
        write(&store_dir.join("k"), "v", 0o644);
        assert!(matches!(
            SecretStore::load(&store_dir, false),
            Err(SecretError::TooOpen { .. })
        ));
    }

    #[test]
    fn debug_and_display_never_show_values() {
        let store = SecretStore::from_pairs([("k".to_owned(), "hunter2".to_owned())]);
        let shown = format!(
            "{store:?} {:?} {}",
            store.get("k").unwrap(),
            store.get("k").unwrap()
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        let err = SecretError::Missing("k".into()).to_string();
        assert!(!err.contains("hunter2"));
    }
}
