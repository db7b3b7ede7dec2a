//! Typed commands and events, their names, and the [`Marshaler`] that turns them into messages
//! and back.

use std::borrow::Cow;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::message::Message;

/// The short name of a type: its path without modules or generics (`app::orders::PlaceOrder`
/// gives `PlaceOrder`).
pub fn short_type_name<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

/// A command: an instruction that exactly one handler carries out.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use streamwise::cqrs::Command;
///
/// #[derive(Serialize, Deserialize)]
/// struct PlaceOrder { id: u32 }
/// impl Command for PlaceOrder {}
///
/// assert_eq!(PlaceOrder::name(), "PlaceOrder");
/// ```
pub trait Command: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The name the command travels under (its `event_type`). Default: the short type name.
    fn name() -> Cow<'static, str> {
        Cow::Borrowed(short_type_name::<Self>())
    }
}

/// An event: a fact that any number of handlers react to.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The name the event travels under (its `event_type`). Default: the short type name.
    fn name() -> Cow<'static, str> {
        Cow::Borrowed(short_type_name::<Self>())
    }
}

/// Encodes typed values as messages and decodes them back. Values pass through serde's data
/// model as a JSON value, which keeps the trait object safe; the default, [`JsonMarshaler`],
/// writes the JSON as the payload.
pub trait Marshaler: Send + Sync + 'static {
    /// A message of type `name` carrying `value`.
    fn marshal(&self, name: &str, value: serde_json::Value) -> Result<Message>;

    /// The value carried by `message`.
    fn unmarshal(&self, message: &Message) -> Result<serde_json::Value>;
}

/// JSON payloads, the type name in `event_type`.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonMarshaler;

impl Marshaler for JsonMarshaler {
    fn marshal(&self, name: &str, value: serde_json::Value) -> Result<Message> {
        Message::new(name.to_owned(), &value)
    }

    fn unmarshal(&self, message: &Message) -> Result<serde_json::Value> {
        message.json()
    }
}

pub(crate) fn to_value<T: Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(Error::Encode)
}

pub(crate) fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::Decode {
        what: format!("payload as {}", short_type_name::<T>()).into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Generic<T> {
        value: T,
    }

    #[test]
    fn short_names_drop_modules_and_generics() {
        assert_eq!(short_type_name::<Generic<u8>>(), "Generic");
        assert_eq!(short_type_name::<String>(), "String");
    }

    #[test]
    fn json_round_trip() {
        let m = JsonMarshaler
            .marshal("Generic", to_value(&Generic { value: 3 }).unwrap())
            .unwrap();
        assert_eq!(m.event_type(), "Generic");
        let back: Generic<u8> = from_value(JsonMarshaler.unmarshal(&m).unwrap()).unwrap();
        assert_eq!(back, Generic { value: 3 });
        let err = from_value::<Generic<u8>>(serde_json::json!({"value": "x"})).unwrap_err();
        assert!(matches!(err, Error::Decode { .. }));
    }
}
