//! Certificates for local TLS: a CA and the leaves it signs, for
//! `localhost` and `127.0.0.1`, as PEM. For development stacks, the
//! benchmark and tests (`resonance-task certs` writes a set); production
//! certificates come from the operator's PKI.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use resonance_reference_gateway::ServerTls;
use resonance_task::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {cause}")]
    File {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A certificate authority.
pub struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its private key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: zeroize::Zeroizing<String>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self(CertifiedIssuer::self_signed(
            params,
            KeyPair::generate()?,
        )?))
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    /// A certificate for `localhost` and `127.0.0.1` named `common_name`:
    /// a server's (also usable as a client's) or a client's only.
    pub fn leaf(&self, common_name: &str, server: bool) -> Result<Leaf, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let cert = params.signed_by(&key, &self.0)?;
        Ok(Leaf {
            cert: cert.pem(),
            key: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// Writes `{name}.pem` (and `{name}.key` when there is a key) in `dir`.
pub fn write(dir: &Path, name: &str, cert: &str, key: Option<&str>) -> Result<(), CertError> {
    let put = |file: String, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|cause| CertError::File { path, cause })
    };
    put(format!("{name}.pem"), cert)?;
    if let Some(key) = key {
        put(format!("{name}.key"), key)?;
    }
    Ok(())
}

/// A CA, a server certificate and a client certificate in one directory:
/// `ca.pem`, `server.pem` + `server.key`, `client.pem` + `client.key`.
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn create(dir: &Path) -> Result<Self, CertError> {
        std::fs::create_dir_all(dir).map_err(|cause| CertError::File {
            path: dir.to_path_buf(),
            cause,
        })?;
        let ca = Ca::new("resonance-task development CA")?;
        write(dir, "ca", &ca.pem(), None)?;
        let server = ca.leaf("resonance gateway", true)?;
        write(dir, "server", &server.cert, Some(&server.key))?;
        let client = ca.leaf("resonance-task", false)?;
        write(dir, "client", &client.cert, Some(&client.key))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A pod's side: trust the CA, present the client certificate.
    pub fn client_tls(&self) -> TlsConfig {
        self.client_tls_as("client")
    }

    /// [`DevPki::client_tls`] presenting `{identity}.pem` and
    /// `{identity}.key` from the same directory instead.
    pub fn client_tls_as(&self, identity: &str) -> TlsConfig {
        TlsConfig {
            enabled: true,
            ca_file: Some(self.path("ca.pem")),
            cert_file: Some(self.path(&format!("{identity}.pem"))),
            key_file: Some(self.path(&format!("{identity}.key"))),
            server_name: None,
        }
    }

    /// A gateway's side: the server certificate, client certificates
    /// required.
    pub fn server_tls(&self) -> Result<ServerTls, CertError> {
        let read = |file: &str| {
            let path = self.path(file);
            std::fs::read(&path).map_err(|cause| CertError::File { path, cause })
        };
        Ok(ServerTls {
            cert: read("server.pem")?,
            key: zeroize::Zeroizing::new(read("server.key")?),
            client_ca: Some(read("ca.pem")?),
        })
    }
}
