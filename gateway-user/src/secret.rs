//! Secrets the daemon holds (target passwords, webhook signing keys): read when needed from
//! a root-only file or a systemd credential (`LoadCredential=`, found in
//! `$CREDENTIALS_DIRECTORY`), so rotating one needs no restart. Never logged.

use std::path::PathBuf;

use crate::config::Secret;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret from {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is readable by others or not owned by the daemon's user (mode {mode:o}, uid \
         {uid}): a secret file must be 0600 or stricter and owned by root",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32, uid: u32 },
    #[error("systemd credential `{0}` is not available ($CREDENTIALS_DIRECTORY is not set)")]
    NoCredentialsDirectory(String),
}

/// The secret's text, without a trailing newline.
pub fn read(secret: &Secret) -> Result<String, SecretError> {
    let path = match secret {
        Secret::File(p) => {
            use std::os::unix::fs::MetadataExt as _;
            let meta = std::fs::metadata(p).map_err(|source| SecretError::Read {
                path: p.clone(),
                source,
            })?;
            if meta.mode() & 0o077 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
                return Err(SecretError::Exposed {
                    path: p.clone(),
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                });
            }
            p.clone()
        }
        Secret::Credential(name) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone()))?;
            PathBuf::from(dir).join(name)
        }
    };
    let text =
        std::fs::read_to_string(&path).map_err(|source| SecretError::Read { path, source })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// A secret file with `mode` in a fresh temporary directory (which goes when dropped).
#[cfg(test)]
pub fn test_file(name: &str, text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    set_mode(&p, mode);
    (dir, p)
}

#[cfg(test)]
pub fn set_mode(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_must_be_private() {
        let (dir, p) = test_file("s", "hunter2\n", 0o600);
        assert_eq!(read(&Secret::File(p.clone())).expect("reads"), "hunter2");
        set_mode(&p, 0o644);
        let e = read(&Secret::File(p.clone())).expect_err("exposed");
        assert!(matches!(e, SecretError::Exposed { mode: 0o644, .. }), "{e}");
        let e = read(&Secret::File(dir.path().join("absent"))).expect_err("absent");
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
