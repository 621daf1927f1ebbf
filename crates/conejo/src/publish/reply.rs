//! The answer to a request ([`Publisher::request`](crate::Publisher::request)).

use bytes::Bytes;
use lapin::BasicProperties;

/// A reply: its body and properties. Decode it with
/// [`decode`](Reply::decode) (`reply.decode::<Json<T>>()`).
#[derive(Debug, Clone)]
pub struct Reply {
    /// The body.
    pub(crate) body: Bytes,
    /// The properties (its correlation id is the request's).
    pub(crate) properties: BasicProperties,
}

impl Reply {
    pub(crate) fn new(body: Bytes, properties: BasicProperties) -> Self {
        Reply { body, properties }
    }

    /// The body.
    #[must_use]
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The properties.
    #[must_use]
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }
}
