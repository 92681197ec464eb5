//! Private keys on disk: PKCS#8 PEM files, mode 0600, in a 0700 directory, replaced atomically.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::KeyPair;

use crate::error::CaError;

/// Creates the key directory with mode 0700 if it does not exist yet.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CaError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    key_dir = %dir.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "CA key directory is readable by group or others"
                );
            }
            Ok(())
        }
        Ok(_) => Err(CaError::Io {
            action: "using key directory",
            path: dir.to_path_buf(),
            cause: std::io::Error::other("not a directory"),
        }),
        Err(_) => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::Io {
                action: "creating key directory",
                path: dir.to_path_buf(),
                cause: source,
            }),
    }
}

/// The path of a key file, refusing names that could leave the key directory.
pub(crate) fn key_path(dir: &Path, name: &str) -> Result<PathBuf, CaError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if !plain {
        return Err(CaError::BadKeyFileName {
            name: name.to_string(),
        });
    }
    Ok(dir.join(name))
}

/// A fresh file name for a new key, e.g. `x509-ca-3f9a...pem`.
pub(crate) fn new_key_name(prefix: &str) -> String {
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    format!("{prefix}-{}.pem", hex::encode(id))
}

/// Writes a key as PKCS#8 PEM with mode 0600: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_key(dir: &Path, name: &str, key: &KeyPair) -> Result<(), CaError> {
    let path = key_path(dir, name)?;
    let tmp = key_path(dir, &format!(".{name}.tmp"))?;
    let io_err = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| CaError::Io {
            action,
            path: p,
            cause: source,
        }
    };
    // A temp file left by a crash mid-write is stale; create_new below needs it gone.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating key file", &tmp))?;
        file.write_all(key.serialize_pem().as_bytes())
            .map_err(io_err("writing key file", &tmp))?;
        file.sync_all().map_err(io_err("syncing key file", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("renaming key file into place", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing key directory", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a key file written by [`write_key`] (or any PKCS#8/SEC1/PKCS#1 PEM key).
pub(crate) fn read_key(dir: &Path, name: &str) -> Result<KeyPair, CaError> {
    let path = key_path(dir, name)?;
    read_key_path(&path)
}

/// Reads a PEM private key from a path; parse errors never include the key material.
pub(crate) fn read_key_path(path: &Path) -> Result<KeyPair, CaError> {
    let pem = fs::read_to_string(path).map_err(|source| CaError::Io {
        action: "reading key file",
        path: path.to_path_buf(),
        cause: source,
    })?;
    // The parser's message is dropped: it may quote bytes of the key.
    KeyPair::from_pem(&pem).map_err(|_| CaError::KeyFile {
        path: path.to_path_buf(),
        reason: "not a PEM private key of a supported type (PKCS#8, SEC1 or PKCS#1; EC P-256/P-384 or RSA)"
            .to_string(),
    })
}

/// Removes a key file that is no longer needed; failure only warns, the key is already out of use.
pub(crate) fn remove_key(dir: &Path, name: &str) {
    let Ok(path) = key_path(dir, name) else {
        return;
    };
    if let Err(e) = fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not delete retired CA key file");
    }
}
