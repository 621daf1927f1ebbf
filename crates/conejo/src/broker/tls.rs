//! TLS settings: a private CA, a client certificate (mutual TLS) and SASL EXTERNAL. The files
//! are read and checked once, in `build()`; what they hold is kept for every reconnection and
//! never shown.

use std::fmt;

#[cfg(feature = "tls")]
use std::path::{Path, PathBuf};

#[cfg(feature = "tls")]
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig, RustlsConnectorConfig};
#[cfg(feature = "tls")]
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[cfg(feature = "tls")]
use crate::Error;

/// TLS settings for `amqps://` URLs: which CA to trust, which client certificate to present,
/// and whether the broker takes the user's identity from that certificate (SASL EXTERNAL).
///
/// Requires conejo's `tls` feature. The files are read and checked by
/// [`Builder::build`](crate::Builder::build): a missing file, a file that is not PEM, or a key
/// that does not belong to its certificate is an [`Error::InvalidConfig`] naming the setting
/// and the path (never the key's content). What they hold is kept in memory and used for every
/// reconnection; `Debug` shows only the paths.
///
/// Without a `TlsConfig`, an `amqps://` URL trusts the operating system's roots only and
/// presents no client certificate.
///
/// ```no_run
/// use conejo::{Conejo, TlsConfig};
/// # struct Orders;
/// # impl conejo::Handler for Orders {
/// #     type Message = Vec<u8>;
/// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
/// # }
///
/// # fn main() -> Result<(), conejo::Error> {
/// // Mutual TLS; the broker takes the user from the certificate's CN (no password).
/// let service = Conejo::builder("amqps://rabbit.internal:5671/%2f")
///     .tls(
///         TlsConfig::new()
///             .ca_file("/etc/conejo/ca.pem")
///             .client_cert("/etc/conejo/client.pem", "/etc/conejo/client-key.pem")
///             .external_auth(),
///     )
///     .queue("orders", Orders)
///     .build()?;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct TlsConfig {
    ca_file: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    external_auth: bool,
}

#[cfg(feature = "tls")]
impl TlsConfig {
    /// No extra CA, no client certificate, password authentication (PLAIN).
    pub fn new() -> Self {
        Self::default()
    }

    /// Also trust the CA certificates in this PEM file (one or more `CERTIFICATE` blocks), on
    /// top of the operating system's roots — the usual way to reach a broker whose certificate
    /// a private CA signed. The roots are not replaced: a server certificate signed by a
    /// publicly trusted CA is still accepted. The broker's certificate must name the host of
    /// the URL (a DNS name or an IP address in its subjectAltName).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Present this client certificate (mutual TLS): `cert` is a PEM file with the
    /// certificate, optionally followed by its intermediate CAs; `key` a PEM file with its
    /// private key (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Authenticate with SASL EXTERNAL: the broker takes the user name from the client
    /// certificate (RabbitMQ: the `rabbitmq_auth_mechanism_ssl` plugin, `EXTERNAL` in
    /// `auth_mechanisms`, and by default the certificate's full distinguished name as user
    /// name — `ssl_cert_login_from = common_name` for the CN), and the URL needs no user nor
    /// password. Requires [`client_cert`](Self::client_cert). Equivalent to
    /// `?auth_mechanism=external` in the URL.
    pub fn external_auth(mut self) -> Self {
        self.external_auth = true;
        self
    }

    /// Whether SASL EXTERNAL was asked for.
    pub(crate) fn uses_external_auth(&self) -> bool {
        self.external_auth
    }

    /// Reads and checks the files, exactly as the connection will use them.
    pub(crate) fn load(&self) -> Result<TlsSetup, Error> {
        let mut lapin = OwnedTLSConfig::default();
        let mut roots = Vec::new();
        if let Some(path) = &self.ca_file {
            let pem = read_text("ca_file", path)?;
            roots = certificates("ca_file", path, pem.as_bytes())?;
            // What the connection does with the file, so that a CA it would refuse fails now.
            RustlsConnectorConfig::new_with_platform_verifier()
                .with_parsable_certificates(roots.clone())
                .connector_with_no_client_auth()
                .map_err(|e| invalid("ca_file", path, &e.to_string()))?;
            lapin.cert_chain = Some(pem);
        }
        if let Some((cert_path, key_path)) = &self.client_cert {
            let cert_pem = read_text("client_cert (certificate)", cert_path)?;
            let chain = certificates("client_cert (certificate)", cert_path, cert_pem.as_bytes())?;
            let key_pem = std::fs::read(key_path).map_err(|e| {
                invalid("client_cert (key)", key_path, &format!("cannot read: {e}"))
            })?;
            // The parser's own message could quote the file: keep it out.
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
                invalid(
                    "client_cert (key)",
                    key_path,
                    "no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1) found",
                )
            })?;
            RustlsConnectorConfig::new_with_platform_verifier()
                .with_parsable_certificates(roots)
                .connector_with_single_cert(chain, key)
                .map_err(|e| {
                    Error::config(
                        None,
                        format!(
                            "TLS client_cert: {} and {} do not make a usable identity: {e}",
                            cert_path.display(),
                            key_path.display()
                        ),
                    )
                })?;
            lapin.identity = Some(OwnedIdentity::PKCS8 {
                pem: cert_pem.into_bytes(),
                key: key_pem,
            });
        } else if self.external_auth {
            return Err(Error::config(
                None,
                "TLS external_auth needs a client certificate (TlsConfig::client_cert)",
            ));
        }
        Ok(TlsSetup {
            config: lapin,
            described: format!("{self:?}"),
        })
    }
}

#[cfg(feature = "tls")]
fn read_text(setting: &str, path: &Path) -> Result<String, Error> {
    let bytes =
        std::fs::read(path).map_err(|e| invalid(setting, path, &format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|_| invalid(setting, path, "not a PEM file (not text)"))
}

#[cfg(feature = "tls")]
fn certificates(
    setting: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(setting, path, &format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(setting, path, "no PEM CERTIFICATE block found"));
    }
    Ok(certs)
}

#[cfg(feature = "tls")]
fn invalid(setting: &str, path: &Path, reason: &str) -> Error {
    Error::config(None, format!("TLS {setting} {}: {reason}", path.display()))
}

/// The checked TLS material a connection attempt uses (empty without the `tls` feature, or
/// when no [`TlsConfig`] was given: the OS roots, no client certificate).
#[derive(Clone, Default)]
pub(crate) struct TlsSetup {
    #[cfg(feature = "tls")]
    config: OwnedTLSConfig,
    /// The settings as given (paths only), for `Debug`.
    #[cfg(feature = "tls")]
    described: String,
}

#[cfg(feature = "tls")]
impl TlsSetup {
    /// What lapin connects with (a copy per attempt: lapin takes it by value).
    pub(crate) fn lapin_config(&self) -> OwnedTLSConfig {
        self.config.clone()
    }
}

// lapin's `OwnedTLSConfig` derives `Debug`, which would print the private key.
impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "tls")]
        if !self.described.is_empty() {
            return f.write_str(&self.described);
        }
        f.write_str("TlsSetup(default)")
    }
}
