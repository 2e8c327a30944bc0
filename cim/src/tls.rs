//! The HTTPS certificate: the configured one, or a self-signed one generated on first start
//! into the state folder and reused afterwards.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::CimError;

/// The certificate and key files to use, generating them when none are configured.
pub fn certificate_files(
    cert: Option<&Path>,
    key: Option<&Path>,
    state_dir: &Path,
    hostname: &str,
) -> Result<(PathBuf, PathBuf), CimError> {
    if let (Some(c), Some(k)) = (cert, key) {
        return Ok((c.to_owned(), k.to_owned()));
    }
    let dir = state_dir.join("cim");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    lockstep_api::private_fs::create_private_dir(&dir).map_err(|source| CimError::Io {
        path: dir.clone(),
        source,
    })?;
    let names = vec![
        hostname.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| CimError::Tls(format!("cannot generate a certificate: {e}")))?;
    write_file(
        &key_path,
        generated.key_pair.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&cert_path, generated.cert.pem().as_bytes(), 0o644)?;
    log::info!(
        "cim: generated a self-signed certificate for {hostname} in {}",
        cert_path.display()
    );
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CimError> {
    let io = |source| CimError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    // The mode is set, not left to the umask: the key 0600, the certificate (public) 0644.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

/// A rustls server config from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, CimError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| CimError::Io {
            path: p.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| CimError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(CimError::Tls(format!(
            "{}: no certificate in it",
            cert.display()
        )));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| CimError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| CimError::Tls(format!("{}: no private key in it", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CimError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| CimError::Tls(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
