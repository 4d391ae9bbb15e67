//! Certificates made in the test (rcgen): a CA, server certificates it
//! signs for the names a test reaches the server by, and a client
//! certificate for mutual TLS. Files are PEM, in a private directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA and its files.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM file): the root clients trust, and the
    /// client CA of a server that wants client certificates.
    pub ca_cert: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate, DER: what a client sees served.
    pub der: Vec<u8>,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("pki dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "Plinth test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_cert = dir.path().join("ca.crt");
        std::fs::write(&ca_cert, ca.pem()).unwrap();
        TestPki { dir, ca, ca_cert }
    }

    /// A server certificate for `localhost`, 127.0.0.1 and `extra` names,
    /// written as `<name>.crt` and `<name>.key`.
    pub fn server(&self, name: &str, extra: &[&str]) -> Pair {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(extra.iter().map(|n| (*n).to_owned()));
        self.issue(name, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate, written as `<name>.crt` and `<name>.key`.
    pub fn client(&self, name: &str) -> Pair {
        self.issue(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let pair = Pair {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestPki {
    fn default() -> TestPki {
        TestPki::new()
    }
}
