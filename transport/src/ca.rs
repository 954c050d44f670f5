//! The installation CA and node certificates (`drv ca init`, `drv ca issue`).
//!
//! Every node has its own certificate signed by the installation CA. The node's role and name are
//! in its one subject alternative name, `NAME.ROLE.drv`, which the peer checks during the TLS
//! handshake (see `quic.rs`). Files: `ca.pem`/`ca.key` and `NAME.pem`/`NAME.key` in one directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::{Role, TransportError};

const CA_CN: &str = "drv installation CA";

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, CA_CN);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn write_private(path: &Path, contents: &str) -> Result<(), TransportError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TransportError::file(path, e))?;
    f.write_all(contents.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| TransportError::file(path, e))
}

fn write_public(path: &Path, contents: &str) -> Result<(), TransportError> {
    std::fs::write(path, contents).map_err(|e| TransportError::file(path, e))
}

fn read(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|e| TransportError::file(path, e))
}

fn cert_err(e: rcgen::Error) -> TransportError {
    TransportError::Certificate(e.to_string())
}

/// Creates `ca.pem` and `ca.key` in `dir` (refuses to overwrite).
pub fn init(dir: &Path) -> Result<PathBuf, TransportError> {
    std::fs::create_dir_all(dir).map_err(|e| TransportError::file(dir, e))?;
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = ca_params().self_signed(&key).map_err(cert_err)?;
    let ca = dir.join("ca.pem");
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    write_public(&ca, &cert.pem())?;
    Ok(ca)
}

/// Issues a certificate for node `name` with `role`, signed by the CA in `dir`; writes
/// `NAME.pem` and `NAME.key` there.
pub fn issue(dir: &Path, role: Role, name: &str) -> Result<PathBuf, TransportError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(TransportError::Certificate(format!("node name {name:?}: use letters, digits and '-'")));
    }
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?).map_err(cert_err)?;
    // The issuer is rebuilt from the CA's fixed parameters and its key: same subject, same key
    // identifier, so no certificate parser is needed.
    let issuer = Issuer::new(ca_params(), ca_key);
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut p = CertificateParams::new(vec![san(name, role)]).map_err(cert_err)?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
    let cert = p.signed_by(&key, &issuer).map_err(cert_err)?;
    let pem = dir.join(format!("{name}.pem"));
    write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    write_public(&pem, &cert.pem())?;
    Ok(pem)
}

/// The subject alternative name that carries a node's name and role.
pub fn san(name: &str, role: Role) -> String {
    format!("{name}.{}.drv", role.as_str())
}

/// Splits `NAME.ROLE.drv` into name and role.
pub fn parse_san(host: &str) -> Option<(&str, Role)> {
    let rest = host.strip_suffix(".drv")?;
    let (name, role) = rest.rsplit_once('.')?;
    Some((name, role.parse().ok()?))
}

/// A node's identity: the CA to trust, its own certificate and key.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    /// Loads `ca.pem`, `NAME.pem`, `NAME.key` from `dir`, and checks that each holds what it
    /// should (so a bad file is named here, not reported by the TLS library without a name).
    pub fn load(dir: &Path, name: &str) -> Result<Identity, TransportError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let cert = |path: &Path| -> Result<String, TransportError> {
            let pem = read(path)?;
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
            match certs {
                Ok(c) if !c.is_empty() => Ok(pem),
                Ok(_) => Err(TransportError::Certificate(format!("{}: no PEM certificate in it", path.display()))),
                Err(e) => Err(TransportError::Certificate(format!("{}: not a PEM certificate: {e}", path.display()))),
            }
        };
        let key_path = dir.join(format!("{name}.key"));
        let key_pem = read(&key_path)?;
        if let Err(e) = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
            return Err(TransportError::Certificate(format!("{}: not a PEM private key: {e}", key_path.display())));
        }
        Ok(Identity {
            name: name.to_owned(),
            ca_pem: cert(&dir.join("ca.pem"))?,
            cert_pem: cert(&dir.join(format!("{name}.pem")))?,
            key_pem,
        })
    }

    /// The role its certificate carries (`NAME.ROLE.drv`).
    pub fn role(&self) -> Result<Role, TransportError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| TransportError::Certificate(format!("the certificate of {}: {e}", self.name)))?;
        crate::tls::peer_identity(&cert)
            .map(|(_, role)| role)
            .map_err(|e| TransportError::Certificate(format!("the certificate of {}: {e}", self.name)))
    }
}
