//! TLS 1.3 (rustls, AES-GCM suites only) for the agent link ([`crate::link`]), with the same trust
//! and role rules as the QUIC endpoints: both sides present a certificate of the installation CA,
//! and a peer is accepted only if its `NAME.ROLE.drv` name carries a role the other side allows.
//! A refusal is logged with the reason (wrong role, no drv name, a certificate of another CA).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};

use crate::ca::parse_san;
use crate::{Identity, Role, TransportError};

/// Application protocol name, as on the QUIC endpoints.
pub const ALPN: &[u8] = b"drv/1";
/// The application protocol of the HTTPS listeners (the config servers').
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

fn cert_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Certificate(e.to_string())
}

/// aws-lc-rs with the AES-GCM suites only (the cipher of the WRL and relay records).
fn provider() -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        )
    });
    Arc::new(p)
}

fn roots(id: &Identity) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(id.ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| cert_err(format!("CA certificate of {}: {e}", id.name)))?).map_err(cert_err)?;
    }
    Ok(Arc::new(roots))
}

fn chain_and_key(id: &Identity) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TransportError> {
    let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("certificate of {}: {e}", id.name)))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| cert_err(format!("key of {}: {e}", id.name)))?;
    Ok((chain, key))
}

/// The node name and role in a certificate's `NAME.ROLE.drv` subject alternative name.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<(String, Role), String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| format!("the certificate's alternative names do not parse: {e}"))?
        .ok_or("the certificate has no subject alternative name")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => parse_san(d).map(|(n, r)| (n.to_owned(), r)),
            _ => None,
        })
        .ok_or_else(|| "the certificate has no NAME.ROLE.drv name".to_owned())
}

/// Checks the role of an already chain-verified certificate; logs a refusal.
fn check_role(cert: &CertificateDer<'_>, allowed: &[Role], side: &str) -> Result<(), rustls::Error> {
    let refused = match peer_identity(cert) {
        Ok((_, role)) if allowed.contains(&role) => return Ok(()),
        Ok((name, role)) => format!("{side} {name} has role {role}, allowed here: {allowed:?}"),
        Err(e) => format!("{side}: {e}"),
    };
    tracing::warn!("refusing {refused}");
    Err(rustls::Error::General(format!("refused {refused}")))
}

/// Server side: the client's chain must lead to the installation CA, and its role be allowed.
#[derive(Debug)]
struct ClientRoleCheck {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<Role>,
}

impl ClientCertVerifier for ClientRoleCheck {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now).inspect_err(|e| {
            tracing::warn!("refusing client: its certificate does not verify against the installation CA: {e}")
        })?;
        check_role(end_entity, &self.allowed, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server's chain must lead to the installation CA and carry the expected role
/// (node names are not known in advance, so the role stands in for the host name).
#[derive(Debug)]
struct ServerRoleCheck {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expect: Role,
}

impl ServerCertVerifier for ServerRoleCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .inspect_err(|e| {
            tracing::warn!("refusing server: its certificate does not verify against the installation CA: {e}")
        })?;
        check_role(end_entity, &[self.expect], "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The configuration of a server presenting `id` and accepting clients whose role is in `allowed`.
pub fn server_config(id: &Identity, allowed: &[Role]) -> Result<Arc<ServerConfig>, TransportError> {
    let provider = provider();
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider.clone())
        .build()
        .map_err(cert_err)?;
    let verifier = Arc::new(ClientRoleCheck { inner, allowed: allowed.to_vec() });
    let (chain, key) = chain_and_key(id)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(cert_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: links are long-lived, and tickets would be post-handshake traffic.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The configuration of a client presenting `id` and accepting only a server with role `expect`.
pub fn client_config(id: &Identity, expect: Role) -> Result<Arc<ClientConfig>, TransportError> {
    let provider = provider();
    let verifier = Arc::new(ServerRoleCheck { roots: roots(id)?, provider: provider.clone(), expect });
    let (chain, key) = chain_and_key(id)?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(cert_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// [`server_config`] for HTTPS (ALPN `http/1.1`): the same trust and role rules.
pub fn https_server_config(id: &Identity, allowed: &[Role]) -> Result<Arc<ServerConfig>, TransportError> {
    let mut cfg = (*server_config(id, allowed)?).clone();
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}

/// The configuration of an HTTPS server presenting `id` to clients without certificates
/// (browsers): who they are is for the application to find out (the config servers' web
/// listener, where users log in).
pub fn https_public_server_config(id: &Identity) -> Result<Arc<ServerConfig>, TransportError> {
    let (chain, key) = chain_and_key(id)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(cert_err)?;
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}

/// [`client_config`] for HTTPS (ALPN `http/1.1`).
pub fn https_client_config(id: &Identity, expect: Role) -> Result<Arc<ClientConfig>, TransportError> {
    let mut cfg = (*client_config(id, expect)?).clone();
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}
