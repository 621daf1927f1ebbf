//! Turning a delivery's body into the handler's message type.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::Context;

/// A message type a [`Handler`](crate::Handler) can receive: decoded from the delivery's body.
///
/// Provided: [`Json<T>`] for any `T: serde::Deserialize` (the common case), `Vec<u8>` for the
/// raw bytes, and `String` for UTF-8 text. Implement it for your own codecs (protobuf,
/// MessagePack…).
///
/// A body that does not decode never reaches the handler: it becomes a
/// [`Failure::Decode`](crate::Failure::Decode), rejected by default.
///
/// ```
/// use conejo::{Context, Decode, DecodeError};
///
/// /// Comma-separated values, one record per message.
/// struct Csv(Vec<String>);
///
/// impl Decode for Csv {
///     fn decode(body: Vec<u8>, _ctx: &Context) -> Result<Self, DecodeError> {
///         let text = String::from_utf8(body).map_err(|e| DecodeError::new("csv", e))?;
///         Ok(Csv(text.split(',').map(str::to_owned).collect()))
///     }
/// }
/// ```
pub trait Decode: Sized + Send + 'static {
    /// Decodes a delivery's body. `ctx` carries the delivery's metadata (content type,
    /// headers) for codecs that need it.
    fn decode(body: Vec<u8>, ctx: &Context) -> Result<Self, DecodeError>;
}

/// A JSON message: the body is decoded with `serde_json` into `T`.
///
/// ```
/// use conejo::{Context, Handler, HandlerError, Json};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Order {
///     id: u64,
/// }
///
/// struct Orders;
///
/// impl Handler for Orders {
///     type Message = Json<Order>;
///
///     async fn handle(&self, Json(order): Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
///         println!("order {}", order.id);
///         Ok(())
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Json<T>(pub T);

impl<T> Json<T> {
    /// The decoded value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Json<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + Send + 'static> Decode for Json<T> {
    fn decode(body: Vec<u8>, _ctx: &Context) -> Result<Self, DecodeError> {
        serde_json::from_slice(&body)
            .map(Json)
            .map_err(|e| DecodeError::new("json", e))
    }
}

impl Decode for Vec<u8> {
    fn decode(body: Vec<u8>, _ctx: &Context) -> Result<Self, DecodeError> {
        Ok(body)
    }
}

impl Decode for String {
    fn decode(body: Vec<u8>, _ctx: &Context) -> Result<Self, DecodeError> {
        String::from_utf8(body).map_err(|e| DecodeError::new("utf-8", e))
    }
}

/// A body that could not be decoded into the handler's message type.
pub struct DecodeError {
    /// The codec that failed ("json", "utf-8", …), for logs.
    codec: &'static str,
    /// The codec's own error.
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl DecodeError {
    /// A decoding failure of `codec` ("json", "protobuf"…).
    pub fn new(
        codec: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        DecodeError {
            codec,
            source: source.into(),
        }
    }

    /// The codec that failed.
    #[must_use]
    pub fn codec(&self) -> &'static str {
        self.codec
    }
}

impl fmt::Debug for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodeError")
            .field("codec", &self.codec)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot decode {} payload: {}", self.codec, self.source)
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u32,
    }

    #[test]
    fn json_and_its_errors() {
        let ctx = Context::detached("q");
        let Json(order) = Json::<Order>::decode(br#"{"id":7}"#.to_vec(), &ctx).unwrap();
        assert_eq!(order, Order { id: 7 });
        let err = Json::<Order>::decode(b"{not json".to_vec(), &ctx).unwrap_err();
        assert_eq!(err.codec(), "json");
        assert!(
            err.to_string()
                .starts_with("cannot decode json payload: key must be a string")
        );
        let err = Json::<Order>::decode(br#"{"id":"x"}"#.to_vec(), &ctx).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn text_and_bytes() {
        let ctx = Context::detached("q");
        assert_eq!(String::decode(b"hi".to_vec(), &ctx).unwrap(), "hi");
        assert!(String::decode(vec![0xff], &ctx).is_err());
        assert_eq!(Vec::<u8>::decode(vec![0xff], &ctx).unwrap(), vec![0xff]);
    }
}
