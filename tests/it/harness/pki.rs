//! Certificate authorities made at test time: a CA and server certificates for the names a
//! test chooses (valid or expired), written as the PEM files servers and the worker are given.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

/// A CA of its own and a folder for the files it issues. Dropped, the folder goes.
pub struct Pki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM, and where they were written.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// When an issued certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    /// From a day ago to a month ahead.
    Current,
    /// Ended yesterday.
    Expired,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let ca_pem = params.self_signed(&key).expect("CA self-signs").pem();
        let pki = Self {
            dir,
            issuer: Issuer::new(params, key),
        };
        std::fs::write(pki.ca_file(), ca_pem).expect("CA written");
        pki
    }

    /// The file holding the CA's certificate: what `ca_file` keys are set to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for `names` (host names or IP addresses).
    pub fn server(&self, file: &str, names: &[&str], validity: Validity) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, params, validity)
    }

    fn issue(&self, file: &str, mut params: CertificateParams, validity: Validity) -> Issued {
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (now - Duration::days(1), now + Duration::days(30)),
            Validity::Expired => (now - Duration::days(30), now - Duration::days(1)),
        };
        let key = KeyPair::generate().expect("key");
        let cert_pem = params.signed_by(&key, &self.issuer).expect("signed").pem();
        let key_pem = key.serialize_pem();
        let cert_file = self.dir.path().join(format!("{file}.pem"));
        let key_file = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_file, &cert_pem).expect("certificate written");
        std::fs::write(&key_file, &key_pem).expect("key written");
        Issued {
            cert_pem,
            key_pem,
            cert_file,
            key_file,
        }
    }
}
