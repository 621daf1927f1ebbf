//! The broker's address: parsed once, checked before any work starts, never printed with its
//! password.

use std::fmt;

use lapin::uri::AMQPUri;

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
    fn ipv6_host() {
        let url: AmqpUrl = "amqp://guest:guest@[::1]:5672/%2f".parse().unwrap();
        assert_eq!(url.uri.authority.host, "::1");
    }
}
