//! The broker's address: parsed once, checked before any work starts, never printed with its
//! password.

use std::fmt;

use lapin::uri::{AMQPScheme, AMQPUri};

use crate::Error;

/// A parsed AMQP URL (`amqp://user:password@host:port/vhost?heartbeat=10`).
///
/// `Display` and `Debug` show the URL with its password replaced by `***`, so it can be
/// logged freely.
///
/// ```
/// use conejo::AmqpUrl;
///
/// let url: AmqpUrl = "amqp://app:s3cret@127.0.0.1:5672/%2f?heartbeat=5".parse().unwrap();
/// assert_eq!(url.to_string(), "amqp://app:***@127.0.0.1:5672/%2f?heartbeat=5");
/// assert!(!format!("{url:?}").contains("s3cret"));
///
/// let err = "http://app:s3cret@host".parse::<AmqpUrl>().unwrap_err();
/// assert!(!err.to_string().contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct AmqpUrl {
    /// What lapin connects with.
    uri: AMQPUri,
    /// The URL as written, with the password replaced, for logs and errors.
    redacted: String,
}

impl AmqpUrl {
    /// The URL with the password redacted.
    #[must_use]
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The heartbeat interval asked for in the URL (`?heartbeat=N`, seconds), if any.
    #[must_use]
    pub fn heartbeat(&self) -> Option<u16> {
        self.uri.query.heartbeat
    }

    /// True for an `amqps://` URL (TLS).
    #[must_use]
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// Authenticate with SASL EXTERNAL (the identity of the client certificate).
    #[cfg(feature = "tls")]
    pub(crate) fn use_external_auth(&mut self) {
        self.uri.query.auth_mechanism = Some(lapin::uri::SASLMechanism::External);
    }

    pub(crate) fn uri(&self) -> AMQPUri {
        self.uri.clone()
    }
}

impl std::str::FromStr for AmqpUrl {
    type Err = Error;

    fn from_str(raw: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidUrl { reason };
        let parsed = url::Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
        let password = parsed.password().unwrap_or_default().to_owned();
        // Whatever the parsers say, never let the password through.
        let scrub = |reason: String| {
            if password.is_empty() {
                reason
            } else {
                reason.replace(&password, "***")
            }
        };
        let redacted = redact(&parsed);
        match parsed.scheme() {
            "amqp" | "amqps" => {}
            other => {
                return Err(invalid(format!(
                    "scheme must be amqp or amqps, not '{other}'"
                )));
            }
        }
        let host = match parsed.host_str() {
            Some(host) if !host.is_empty() => host.trim_matches(['[', ']']).to_owned(),
            _ => return Err(invalid(format!("no host in {redacted}"))),
        };
        let mut uri: AMQPUri = raw
            .parse()
            .map_err(|reason: String| invalid(scrub(format!("{reason} in {redacted}"))))?;
        // lapin's parser only keeps domain names (an IP address falls back to "localhost").
        uri.authority.host = host;
        Ok(AmqpUrl { uri, redacted })
    }
}

/// Parses one broker address or several: a comma-separated list of URLs
/// (`amqp://u:p@h1:5672,amqp://u:p@h2:5672`), or one URL with several hosts
/// (`amqp://u:p@h1:5672,h2:5672,h3/vhost`). Each address is checked as an [`AmqpUrl`].
pub(crate) fn parse_list(raw: &str) -> Result<Vec<AmqpUrl>, Error> {
    let raw = raw.trim();
    let mut urls = Vec::new();
    for one in split_urls(raw) {
        for expanded in expand_hosts(one) {
            urls.push(expanded.parse()?);
        }
    }
    if urls.is_empty() {
        return Err(Error::InvalidUrl {
            reason: "no broker address".to_owned(),
        });
    }
    Ok(urls)
}

/// Splits at the commas that start another `amqp://` or `amqps://` URL.
fn split_urls(raw: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (index, _) in raw.match_indices(',') {
        let next = raw[index + 1..].trim_start().to_ascii_lowercase();
        if next.starts_with("amqp://") || next.starts_with("amqps://") {
            parts.push(raw[start..index].trim());
            start = index + 1;
        }
    }
    parts.push(raw[start..].trim());
    parts
}

/// `scheme://userinfo@h1,h2/rest` → one URL per host.
fn expand_hosts(raw: &str) -> Vec<String> {
    let Some(scheme_end) = raw.find("://") else {
        return vec![raw.to_owned()];
    };
    let after = &raw[scheme_end + 3..];
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let authority = &after[..authority_end];
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return vec![raw.to_owned()];
    }
    let prefix = &raw[..scheme_end + 3];
    let rest = &after[authority_end..];
    hosts
        .split(',')
        .map(|host| format!("{prefix}{userinfo}{}{rest}", host.trim()))
        .collect()
}

fn redact(url: &url::Url) -> String {
    let mut shown = url.clone();
    if url.password().is_some() {
        // Cannot fail for a URL that already has a password.
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string().replace("%2A%2A%2A", "***")
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AmqpUrl").field(&self.redacted).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_ip_hosts_and_query() {
        let url: AmqpUrl = "amqp://guest:guest@127.0.0.1:5673/vh?heartbeat=1"
            .parse()
            .unwrap();
        assert_eq!(url.uri.authority.host, "127.0.0.1");
        assert_eq!(url.uri.authority.port, 5673);
        assert_eq!(url.uri.vhost, "vh");
        assert_eq!(url.heartbeat(), Some(1));
        assert_eq!(
            url.to_string(),
            "amqp://guest:***@127.0.0.1:5673/vh?heartbeat=1"
        );
    }

    #[test]
    fn errors_never_show_the_password() {
        for raw in [
            "amqp://u:hunter2@host:notaport/",
            "amqp://u:hunter2@host/?heartbeat=abc",
            "ftp://u:hunter2@host/",
            "amqp://u:hunter2@/",
            "not a url hunter2",
        ] {
            let err = raw.parse::<AmqpUrl>().unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("hunter2"), "{raw} -> {shown}");
        }
    }

    #[test]
    fn lists_of_addresses() {
        let hosts = |raw: &str| -> Vec<String> {
            parse_list(raw)
                .unwrap()
                .iter()
                .map(|u| {
                    format!(
                        "{}:{}/{}",
                        u.uri.authority.host, u.uri.authority.port, u.uri.vhost
                    )
                })
                .collect()
        };
        assert_eq!(hosts("amqp://u:p@h1:5672/v"), vec!["h1:5672/v"]);
        assert_eq!(
            hosts("amqp://u:p@h1:5672/v, amqp://u:p@h2:5673/v"),
            vec!["h1:5672/v", "h2:5673/v"]
        );
        assert_eq!(
            hosts("amqp://u:p,w@h1:5672,h2,127.0.0.1:5674/v?heartbeat=5"),
            vec!["h1:5672/v", "h2:5672/v", "127.0.0.1:5674/v"]
        );
        let urls = parse_list("amqp://u:s3cret@h1,h2/v?heartbeat=5").unwrap();
        assert_eq!(urls[1].to_string(), "amqp://u:***@h2/v?heartbeat=5");
        assert_eq!(urls[1].heartbeat(), Some(5));
        let err = parse_list("amqp://u:s3cret@h1,amqp://u:s3cret@h2:x").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(parse_list("").is_err());
    }

    #[test]
    fn ipv6_host() {
        let url: AmqpUrl = "amqp://guest:guest@[::1]:5672/%2f".parse().unwrap();
        assert_eq!(url.uri.authority.host, "::1");
    }
}
