//! The TLS files of an outgoing connection, read from disk: a file that is
//! not what its key says is refused naming the key, and rotated files are
//! read again on the next connection. Certificates are generated per test.

use std::path::{Path, PathBuf};

use resonance_task::tls::{TlsConfig, TlsFiles, TlsMaterial};
use resonance_testkit::certs::Ca;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn pem_pair() -> (String, String) {
    let leaf = Ca::new("test CA").unwrap().leaf("test", false).unwrap();
    (leaf.cert, leaf.key.to_string())
}

#[test]
fn bad_files_are_named_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = write(dir.path(), "junk.pem", "hello");
    let cfg = TlsConfig {
        ca_file: Some(not_pem.clone()),
        ..Default::default()
    };
    let err = TlsMaterial::read("gateway.tls", &cfg).unwrap_err();
    assert_eq!(err.key, "gateway.tls.ca_file");
    assert!(err.to_string().contains("no PEM certificate"), "{err}");

    let (cert, _) = pem_pair();
    let cert = write(dir.path(), "cert.pem", &cert);
    let cfg = TlsConfig {
        cert_file: Some(cert.clone()),
        ..Default::default()
    };
    assert_eq!(
        TlsMaterial::read("nats.tls", &cfg).unwrap_err().key,
        "nats.tls.key_file"
    );
    let cfg = TlsConfig {
        cert_file: Some(cert),
        key_file: Some(not_pem),
        ..Default::default()
    };
    let err = TlsMaterial::read("redis.tls", &cfg).unwrap_err();
    assert_eq!(err.key, "redis.tls.key_file");
    let cfg = TlsConfig {
        ca_file: Some(dir.path().join("missing.pem")),
        ..Default::default()
    };
    assert!(TlsMaterial::read("etcd.tls", &cfg).is_err());
}

#[test]
fn changed_files_are_read_again_and_keys_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pem_pair();
    let cert_path = write(dir.path(), "cert.pem", &cert);
    let key_path = write(dir.path(), "key.pem", &key);
    let files = TlsFiles::new(
        "gateway.tls",
        &TlsConfig {
            cert_file: Some(cert_path.clone()),
            key_file: Some(key_path.clone()),
            ..Default::default()
        },
    );
    let first = files.current().unwrap();
    assert_eq!(first.cert.as_deref(), Some(cert.as_bytes()));
    assert!(!format!("{first:?}").contains("PRIVATE KEY"));

    // Another pair of different length, so the stamp changes even
    // within the file system's timestamp granularity.
    let (cert2, key2) = pem_pair();
    let cert2 = format!("{cert2}\n");
    write(dir.path(), "cert.pem", &cert2);
    write(dir.path(), "key.pem", &key2);
    let second = files.current().unwrap();
    assert_eq!(second.cert.as_deref(), Some(cert2.as_bytes()));
    assert_eq!(
        second.key.as_deref().map(|k| k.as_slice()),
        Some(key2.as_bytes())
    );

    // A half-written rotation is refused until it is whole.
    write(dir.path(), "key.pem", "");
    assert_eq!(files.current().unwrap_err().key, "gateway.tls.key_file");
    write(dir.path(), "key.pem", &key2);
    assert!(files.current().is_ok());
}
