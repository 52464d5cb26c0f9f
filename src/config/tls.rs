//! Files of secure transport (docs/contract.md §13): CAs to trust and the client certificate
//! of the EXTERNAL mechanism, named by the settings and read as PEM.
//!
//! Each file is checked when the settings load (so `transfer-worker config` and a starting
//! worker name a missing or wrong file by its key) and read again where it is used: the broker's
//! files at every connection, so a certificate rotated on disk is picked up at the next
//! reconnect; the API's and Redis's when their clients are built.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// `[amqp.tls]`: for `amqps://` URLs. All empty: the system's roots only, no client
/// certificate.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AmqpTlsSettings {
    /// A CA (PEM) to trust besides the system's roots.
    pub ca_file: PathBuf,
    /// A client certificate (PEM, chain first), for `?auth_mechanism=external`.
    pub cert_file: PathBuf,
    /// Its private key (PEM, unencrypted).
    pub key_file: PathBuf,
}

/// What `[amqp.tls]` names, read.
#[derive(Debug, Clone, Default)]
pub struct AmqpTlsFiles {
    /// Extra roots, PEM.
    pub ca: Option<String>,
    /// Client certificate chain and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl AmqpTlsSettings {
    /// Whether a client certificate is configured.
    pub fn has_identity(&self) -> bool {
        is_set(&self.cert_file)
    }

    /// Whether any file is named.
    pub fn is_set(&self) -> bool {
        is_set(&self.ca_file) || is_set(&self.cert_file) || is_set(&self.key_file)
    }

    /// Reads and checks the files.
    pub fn read(&self) -> Result<AmqpTlsFiles, ConfigError> {
        let ca = certificates("amqp.tls.ca_file", &self.ca_file)?
            .map(|pem| String::from_utf8(pem).expect("checked to be PEM, which is ASCII"));
        let identity = match (
            certificates("amqp.tls.cert_file", &self.cert_file)?,
            private_key("amqp.tls.key_file", &self.key_file)?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("amqp.tls.key_file", "cert_file needs its key")),
            (None, Some(_)) => {
                return Err(invalid(
                    "amqp.tls.cert_file",
                    "key_file needs its certificate",
                ));
            }
        };
        Ok(AmqpTlsFiles { ca, identity })
    }
}

/// Whether a path key is set (empty means not).
pub fn is_set(path: &Path) -> bool {
    !path.as_os_str().is_empty()
}

/// The certificates of a PEM file named by `key`, or `None` when the key is empty. A file
/// that cannot be read, or holds no certificate, is an error naming the key.
pub fn certificates(key: &str, path: &Path) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(pem) = read(key, path)? else {
        return Ok(None);
    };
    let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match parsed {
        Ok(certs) if !certs.is_empty() => Ok(Some(pem)),
        Ok(_) => Err(invalid(
            key,
            format!("{} holds no PEM certificate", path.display()),
        )),
        Err(e) => Err(invalid(
            key,
            format!("{} is not valid PEM: {e}", path.display()),
        )),
    }
}

/// The private key of a PEM file named by `key`, or `None` when the key is empty.
pub fn private_key(key: &str, path: &Path) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(pem) = read(key, path)? else {
        return Ok(None);
    };
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(
            key,
            format!("{} holds no usable private key: {e}", path.display()),
        )
    })?;
    Ok(Some(pem))
}

fn read(key: &str, path: &Path) -> Result<Option<Vec<u8>>, ConfigError> {
    if !is_set(path) {
        return Ok(None);
    }
    std::fs::read(path)
        .map(Some)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_keys_read_as_nothing() {
        let files = AmqpTlsSettings::default().read().unwrap();
        assert!(files.ca.is_none() && files.identity.is_none());
    }

    #[test]
    fn a_missing_or_wrong_file_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = AmqpTlsSettings {
            ca_file: dir.path().join("absent.pem"),
            ..Default::default()
        };
        let err = missing.read().unwrap_err().to_string();
        assert!(
            err.contains("amqp.tls.ca_file") && err.contains("absent.pem"),
            "{err}"
        );
        let wrong = AmqpTlsSettings {
            ca_file: not_pem.clone(),
            ..Default::default()
        };
        let err = wrong.read().unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let cert = dir.path().join("cert.pem");
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&cert, issued.cert.pem()).unwrap();
        let half = AmqpTlsSettings {
            cert_file: cert,
            ..Default::default()
        };
        let err = half.read().unwrap_err().to_string();
        assert!(
            err.contains("amqp.tls.key_file: cert_file needs its key"),
            "{err}"
        );
        let key = private_key("fleet.x", &not_pem).unwrap_err().to_string();
        assert!(
            key.contains("fleet.x") && key.contains("no usable private key"),
            "{key}"
        );
    }
}
