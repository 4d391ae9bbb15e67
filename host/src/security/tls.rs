//! TLS with rustls on every port: the server configurations built from PEM
//! files, rebuilt whole on rotation. Connections take the configuration
//! current when they are accepted; those already open keep theirs, so a
//! rotation drops nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// The PEM files TLS is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a client CA, every port asks for a client certificate and
    /// refuses a connection without one signed by it (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }
}

/// Which protocols a port speaks, for ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocols {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// REST and metrics: HTTP/2 and HTTP/1.1.
    Http,
}

/// One generation of TLS: a server configuration per kind of port.
#[derive(Debug)]
pub struct TlsConfigs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
    /// The leaf certificate served (DER), to tell generations apart.
    pub leaf: CertificateDer<'static>,
}

impl TlsConfigs {
    pub fn for_port(&self, protocols: PortProtocols) -> Arc<ServerConfig> {
        match protocols {
            PortProtocols::Grpc => Arc::clone(&self.grpc),
            PortProtocols::Http => Arc::clone(&self.http),
        }
    }

    /// Reads and checks the files: a chain that does not parse, a key that
    /// does not match the leaf, or an unusable client CA is an error naming
    /// the file.
    pub fn load(files: &TlsFiles) -> Result<TlsConfigs, String> {
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|err| format!("TLS key {}: {err}", files.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("TLS: {err}"))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|err| format!("TLS client CA {}: {err}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|err| format!("TLS client CA {}: {err}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let leaf = chain[0].clone();
        let config = builder.with_single_cert(chain, key).map_err(|err| {
            format!(
                "TLS certificate {} with key {}: {err}",
                files.cert.display(),
                files.key.display()
            )
        })?;
        let with_alpn = |protocols: &[&[u8]]| {
            let mut config = config.clone();
            config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        };
        Ok(TlsConfigs {
            grpc: with_alpn(&[b"h2"]),
            http: with_alpn(&[b"h2", b"http/1.1"]),
            leaf,
        })
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("TLS certificates {}: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS certificates {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            client_ca: None,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_pair_loads_with_alpn_per_port() {
        let dir = tempfile::tempdir().unwrap();
        let configs = TlsConfigs::load(&pair(dir.path(), "a")).unwrap();
        assert_eq!(
            configs.for_port(PortProtocols::Grpc).alpn_protocols,
            vec![b"h2".to_vec()]
        );
        assert_eq!(
            configs.for_port(PortProtocols::Http).alpn_protocols.len(),
            2
        );
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        let b = pair(dir.path(), "b");
        let mixed = TlsFiles { key: b.key, ..a };
        let err = TlsConfigs::load(&mixed).unwrap_err();
        assert!(err.contains("a.crt") && err.contains("b.key"), "{err}");
    }

    #[test]
    fn unreadable_and_empty_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        std::fs::write(dir.path().join("empty.crt"), "not pem").unwrap();
        let empty = TlsFiles {
            cert: dir.path().join("empty.crt"),
            ..a.clone()
        };
        assert!(TlsConfigs::load(&empty).unwrap_err().contains("empty.crt"));
        let missing = TlsFiles {
            key: dir.path().join("nope.key"),
            ..a.clone()
        };
        assert!(TlsConfigs::load(&missing).unwrap_err().contains("nope.key"));
        let bad_ca = TlsFiles {
            client_ca: Some(dir.path().join("empty.crt")),
            ..a
        };
        assert!(TlsConfigs::load(&bad_ca).unwrap_err().contains("empty.crt"));
    }
}
