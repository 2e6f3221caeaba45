//! TLS material of outgoing connections: the PEM files a [`TlsConfig`]
//! names, checked when the configuration is validated and read again when
//! they change (a rotated certificate is used by the next connection, with
//! no restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use serde::{Deserialize, Serialize};

/// TLS of one outgoing connection. Files are PEM; they are checked at
/// start-up and read again when they change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Use TLS even where the address does not ask for it (`tls://`,
    /// `rediss://`, `https://`, `grpcs://` always do).
    pub enabled: bool,
    /// CA bundle that signs the servers' certificates; unset: the system's
    /// trust store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain, for servers that require one (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// Name the server certificate must carry, when it differs from the
    /// host in the address.
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// What is wrong with the settings of `section` (e.g. `etcd.tls`), as
    /// (key, reason): a server name where the client cannot use one
    /// (`names_server` false), or files that are missing or not PEM.
    pub fn problems(&self, section: &str, names_server: bool) -> Vec<(String, String)> {
        let mut found = Vec::new();
        if let Some(name) = &self.server_name {
            let key = format!("{section}.server_name");
            if !names_server {
                found.push((
                    key.clone(),
                    "is not supported here; address the server by a name its certificate carries"
                        .to_string(),
                ));
            }
            if name.trim().is_empty() {
                found.push((key, "must not be empty".to_string()));
            }
        }
        if let Err(e) = TlsMaterial::read(section, self) {
            found.push((e.key, format!("{}: {}", e.path.display(), e.reason)));
        }
        found
    }
}

/// Makes ring (which the NATS client links already) the process's TLS
/// crypto provider: reqwest and redis are built without a default one.
/// Call before building any such client; a second call is harmless.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A TLS file that cannot be used; `key` is its configuration key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("configuration key `{key}`: {path}: {reason}")]
pub struct TlsError {
    pub key: String,
    pub path: PathBuf,
    pub reason: String,
}

/// The PEM contents of one [`TlsConfig`]'s files.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca: Option<Arc<[u8]>>,
    pub cert: Option<Arc<[u8]>>,
    /// The private key; never printed (`Debug` leaves it out).
    pub key: Option<Arc<zeroize::Zeroizing<Vec<u8>>>>,
    pub server_name: Option<String>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("cert", &self.cert.as_ref().map(|c| c.len()))
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("server_name", &self.server_name)
            .finish()
    }
}

#[derive(Clone, Copy)]
enum Pem {
    Certificates,
    PrivateKey,
}

/// Reads one file and checks that it holds what it should.
fn read_pem(key: String, path: &Path, kind: Pem) -> Result<Vec<u8>, TlsError> {
    let fail = |reason: String| TlsError {
        key: key.clone(),
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    match kind {
        Pem::Certificates => {
            let mut count = 0;
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                cert.map_err(|e| fail(format!("not a PEM certificate: {e}")))?;
                count += 1;
            }
            if count == 0 {
                return Err(fail("holds no PEM certificate".into()));
            }
        }
        Pem::PrivateKey => {
            // The parse error could quote key material: say only what failed.
            PrivateKeyDer::from_pem_slice(&bytes)
                .map_err(|_| fail("holds no PEM private key".into()))?;
        }
    }
    Ok(bytes)
}

impl TlsMaterial {
    /// Reads and checks the files of `cfg`; `section` prefixes the keys in
    /// errors (`gateway.tls`).
    pub fn read(section: &str, cfg: &TlsConfig) -> Result<Self, TlsError> {
        let key = |name: &str| format!("{section}.{name}");
        let ca = cfg
            .ca_file
            .as_deref()
            .map(|p| read_pem(key("ca_file"), p, Pem::Certificates))
            .transpose()?;
        let (cert, private) = match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => (
                Some(read_pem(key("cert_file"), c, Pem::Certificates)?),
                Some(read_pem(key("key_file"), k, Pem::PrivateKey)?),
            ),
            (None, None) => (None, None),
            (Some(c), None) => {
                return Err(TlsError {
                    key: key("key_file"),
                    path: c.clone(),
                    reason: "a client certificate needs its key".into(),
                });
            }
            (None, Some(k)) => {
                return Err(TlsError {
                    key: key("cert_file"),
                    path: k.clone(),
                    reason: "a client key needs its certificate".into(),
                });
            }
        };
        Ok(Self {
            ca: ca.map(Arc::from),
            cert: cert.map(Arc::from),
            key: private.map(|k| Arc::new(zeroize::Zeroizing::new(k))),
            server_name: cfg.server_name.clone(),
        })
    }

    /// A tonic client TLS configuration: the CA bundle or else the
    /// system's roots, the client identity when there is one.
    pub fn client_config(&self) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(cert, key.as_slice()));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        tls
    }
}

/// What identifies a file's version: its modification time and length.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: Option<&Path>) -> Stamp {
    let meta = std::fs::metadata(path?).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A [`TlsConfig`] whose files are read again when they change: each
/// [`TlsFiles::current`] compares their modification times and lengths
/// with those last read.
pub struct TlsFiles {
    section: String,
    cfg: TlsConfig,
    last: Mutex<Option<([Stamp; 3], TlsMaterial)>>,
}

impl TlsFiles {
    pub fn new(section: &str, cfg: &TlsConfig) -> Self {
        Self {
            section: section.to_string(),
            cfg: cfg.clone(),
            last: Mutex::new(None),
        }
    }

    fn stamps(&self) -> [Stamp; 3] {
        [
            stamp(self.cfg.ca_file.as_deref()),
            stamp(self.cfg.cert_file.as_deref()),
            stamp(self.cfg.key_file.as_deref()),
        ]
    }

    /// The files' current contents. A change is read and checked; if the
    /// new files are unusable (say, a certificate written before its key),
    /// the error is returned and the next call tries again.
    pub fn current(&self) -> Result<TlsMaterial, TlsError> {
        let stamps = self.stamps();
        let mut last = self.last.lock().expect("TLS files lock");
        if let Some((seen, material)) = last.as_ref()
            && *seen == stamps
        {
            return Ok(material.clone());
        }
        let material = TlsMaterial::read(&self.section, &self.cfg)?;
        if last.is_some() {
            tracing::info!(section = %self.section, "TLS files changed; new connections use them");
            metrics::counter!(crate::telemetry::metrics::TLS_RELOADS, "section" => self.section.clone())
                .increment(1);
        }
        *last = Some((stamps, material.clone()));
        Ok(material)
    }
}
