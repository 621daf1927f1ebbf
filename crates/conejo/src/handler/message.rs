//! Turning a delivery's body into the handler's message type.

use std::fmt;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::{Context, Encode, EncodeError, Reply};

/// A message type a [`Handler`](crate::Handler) can receive: decoded from the delivery's body.
///
/// Provided: [`Json<T>`] for any `T: serde::Deserialize` (the common case), [`Bytes`] for the
/// raw body without a copy, `Vec<u8>` for an owned copy of it, and `String` for UTF-8 text.
/// Implement it for your own codecs (protobuf, MessagePack…).
///
/// The body is borrowed: conejo keeps it, to republish the message as it came if it must be
/// retried or dead-lettered. A body that does not decode never reaches the handler: it
/// becomes a [`Failure::Decode`](crate::Failure::Decode), dead-lettered at once by default.
///
/// ```
/// use conejo::{Context, Decode, DecodeError};
///
/// /// Comma-separated values, one record per message.
/// struct Csv(Vec<String>);
///
/// impl Decode for Csv {
///     fn decode(body: &[u8], _ctx: &Context) -> Result<Self, DecodeError> {
///         let text = std::str::from_utf8(body).map_err(|e| DecodeError::new("csv", e))?;
///         Ok(Csv(text.split(',').map(str::to_owned).collect()))
///     }
/// }
/// ```
pub trait Decode: Sized + Send + 'static {
    /// Decodes a delivery's body. `ctx` carries the delivery's metadata (content type,
    /// headers) for codecs that need it.
    fn decode(body: &[u8], ctx: &Context) -> Result<Self, DecodeError>;

    /// Decodes from the shared body; override it to keep the bytes without a copy (as
    /// [`Bytes`] does). The default calls [`decode`](Self::decode).
    fn decode_shared(body: &Bytes, ctx: &Context) -> Result<Self, DecodeError> {
        Self::decode(body, ctx)
    }
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

/// A body labelled with a content type that is not JSON is refused (a decode failure that
/// names the type) rather than parsed; a body without a content type is parsed.
impl<T: DeserializeOwned + Send + 'static> Decode for Json<T> {
    fn decode(body: &[u8], ctx: &Context) -> Result<Self, DecodeError> {
        if let Some(content_type) = ctx.content_type()
            && !is_json(content_type)
        {
            return Err(DecodeError::new(
                "json",
                format!("unsupported content type '{content_type}' (expected JSON)"),
            ));
        }
        serde_json::from_slice(body)
            .map(Json)
            .map_err(|e| DecodeError::new("json", e))
    }
}

/// A JSON body to publish: `T` serialised with `serde_json`, content type
/// `application/json`.
impl<T: serde::Serialize> Encode for Json<T> {
    fn encode(self) -> Result<Bytes, EncodeError> {
        serde_json::to_vec(&self.0)
            .map(Bytes::from)
            .map_err(|e| EncodeError::new("json", e))
    }

    fn content_type(&self) -> Option<&'static str> {
        Some("application/json")
    }
}

impl Reply {
    /// Decodes the reply's body as a handler's message is decoded: `reply.decode::<Json<T>>()`.
    ///
    /// # Errors
    /// A [`DecodeError`] when the body is not what `T` decodes.
    pub fn decode<T: Decode>(&self) -> Result<T, DecodeError> {
        let ctx = Context::detached("").with_properties(self.properties().clone());
        T::decode_shared(self.body(), &ctx)
    }
}

/// `application/json`, `text/json`, `application/<anything>+json`, parameters ignored.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

impl Decode for Bytes {
    fn decode(body: &[u8], _ctx: &Context) -> Result<Self, DecodeError> {
        Ok(Bytes::copy_from_slice(body))
    }

    fn decode_shared(body: &Bytes, _ctx: &Context) -> Result<Self, DecodeError> {
        Ok(body.clone())
    }
}

impl Decode for Vec<u8> {
    fn decode(body: &[u8], _ctx: &Context) -> Result<Self, DecodeError> {
        Ok(body.to_vec())
    }
}

impl Decode for String {
    fn decode(body: &[u8], _ctx: &Context) -> Result<Self, DecodeError> {
        std::str::from_utf8(body)
            .map(str::to_owned)
            .map_err(|e| DecodeError::new("utf-8", e))
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
        let Json(order) = Json::<Order>::decode(br#"{"id":7}"#, &ctx).unwrap();
        assert_eq!(order, Order { id: 7 });
        let err = Json::<Order>::decode(b"{not json", &ctx).unwrap_err();
        assert_eq!(err.codec(), "json");
        assert!(
            err.to_string()
                .starts_with("cannot decode json payload: key must be a string")
        );
        let err = Json::<Order>::decode(br#"{"id":"x"}"#, &ctx).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn json_refuses_other_content_types() {
        let labelled = |ct: &str| {
            Context::detached("q")
                .with_properties(lapin::BasicProperties::default().with_content_type(ct.into()))
        };
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "application/vnd.x+json",
            "Text/JSON",
        ] {
            assert!(
                Json::<Order>::decode(br#"{"id":1}"#, &labelled(ok)).is_ok(),
                "{ok}"
            );
        }
        let err =
            Json::<Order>::decode(b"<order id='1'/>", &labelled("application/xml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot decode json payload: unsupported content type 'application/xml' (expected JSON)"
        );
    }

    #[test]
    fn text_and_bytes() {
        let ctx = Context::detached("q");
        assert_eq!(String::decode(b"hi", &ctx).unwrap(), "hi");
        assert!(String::decode(&[0xff], &ctx).is_err());
        assert_eq!(Vec::<u8>::decode(&[0xff], &ctx).unwrap(), vec![0xff]);
        let shared = Bytes::from_static(b"raw");
        assert_eq!(Bytes::decode_shared(&shared, &ctx).unwrap(), shared);
    }
}
