//! [`WireFormat`]: a layout of stream entries by name, for configuration files, and
//! [`WireSettings`], a peer layout's settings beyond its defaults; resolved to a [`Codec`].

use crate::codec::{Codec, JsonCodec};
use crate::error::{Error, Result};

/// A layout of entries by name, for configuration files (`codec: watermill`): streamwise's
/// own ([`JsonCodec`]), or a peer's (the `interop` feature: natricine's, Watermill's, with
/// their default settings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireFormat {
    /// [`JsonCodec`], the default.
    #[default]
    Streamwise,
    /// natricine-redisstream's layout (`streamwise::interop::NatricineCodec`).
    Natricine,
    /// watermill-redisstream's layout (`streamwise::interop::WatermillCodec`).
    Watermill,
}

impl std::str::FromStr for WireFormat {
    type Err = Error;

    /// `streamwise`, `natricine` or `watermill`.
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "streamwise" | "json" => Ok(WireFormat::Streamwise),
            "natricine" => Ok(WireFormat::Natricine),
            "watermill" => Ok(WireFormat::Watermill),
            other => Err(Error::invalid(
                "codec",
                format_args!("{other:?} is not one of streamwise, natricine, watermill"),
            )),
        }
    }
}

/// A peer layout's settings beyond its defaults (`codec:` as a mapping in configuration
/// files), each as the codec's method of the same name sets it
/// (`streamwise::interop::NatricineCodec`, `WatermillCodec`); `None` keeps the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WireSettings {
    /// The metadata key of the event type (natricine `event_type`, Watermill `name`).
    pub event_type_key: Option<String>,
    /// The event type of an entry without that key (else it is dead-lettered).
    pub fallback_event_type: Option<String>,
    /// Every entry is of this type (a topic that carries one type); excludes the two above.
    pub fixed_event_type: Option<String>,
    /// The field of the message id.
    pub uuid_field: Option<String>,
    /// The field of the payload.
    pub payload_field: Option<String>,
    /// The field of the MessagePack metadata.
    pub metadata_field: Option<String>,
}

impl WireSettings {
    fn is_default(&self) -> bool {
        *self == WireSettings::default()
    }
}

/// `codec` (either peer's: they have the same builder methods) with each of `settings` set
/// by the method of its name.
#[cfg(feature = "interop")]
macro_rules! with_settings {
    ($codec:expr, $settings:expr) => {{
        let settings: &WireSettings = $settings;
        let mut codec = $codec;
        if let Some(name) = &settings.uuid_field {
            codec = codec.uuid_field(name);
        }
        if let Some(name) = &settings.payload_field {
            codec = codec.payload_field(name);
        }
        if let Some(name) = &settings.metadata_field {
            codec = codec.metadata_field(name);
        }
        if let Some(key) = &settings.event_type_key {
            codec = codec.event_type_key(key.clone());
        }
        if let Some(event_type) = &settings.fallback_event_type {
            codec = codec.fallback_event_type(event_type.as_str());
        }
        if let Some(event_type) = &settings.fixed_event_type {
            codec = codec.fixed_event_type(event_type.as_str());
        }
        codec
    }};
}

impl WireFormat {
    /// The codec of this layout with its defaults; a peer's needs the `interop` feature.
    pub fn codec(self) -> Result<std::sync::Arc<dyn Codec>> {
        self.codec_with(&WireSettings::default())
    }

    /// The codec of this layout with `settings`, checked: they apply to the peers' layouts
    /// only, and a fixed event type excludes the event type's key and fallback.
    pub fn codec_with(self, settings: &WireSettings) -> Result<std::sync::Arc<dyn Codec>> {
        if self == WireFormat::Streamwise && !settings.is_default() {
            return Err(Error::invalid(
                "codec",
                "event type and field settings apply to the natricine and watermill layouts only",
            ));
        }
        if settings.fixed_event_type.is_some()
            && (settings.event_type_key.is_some() || settings.fallback_event_type.is_some())
        {
            return Err(Error::invalid(
                "codec",
                "fixed_event_type types every entry: it excludes event_type_key and fallback_event_type",
            ));
        }
        match self {
            WireFormat::Streamwise => Ok(std::sync::Arc::new(JsonCodec)),
            #[cfg(feature = "interop")]
            WireFormat::Natricine => Ok(std::sync::Arc::new(with_settings!(
                crate::interop::NatricineCodec::default(),
                checked(settings)?
            ))),
            #[cfg(feature = "interop")]
            WireFormat::Watermill => Ok(std::sync::Arc::new(with_settings!(
                crate::interop::WatermillCodec::default(),
                checked(settings)?
            ))),
            #[cfg(not(feature = "interop"))]
            WireFormat::Natricine | WireFormat::Watermill => Err(Error::invalid(
                "codec",
                "natricine's and Watermill's layouts need streamwise's interop feature",
            )),
        }
    }
}

/// Refuses empty names: an empty field name or event type is a mistake in the file.
#[cfg(feature = "interop")]
fn checked(settings: &WireSettings) -> Result<&WireSettings> {
    for (what, name) in [
        ("uuid_field", &settings.uuid_field),
        ("payload_field", &settings.payload_field),
        ("metadata_field", &settings.metadata_field),
        ("event_type_key", &settings.event_type_key),
        ("fallback_event_type", &settings.fallback_event_type),
        ("fixed_event_type", &settings.fixed_event_type),
    ] {
        if name.as_deref() == Some("") {
            return Err(Error::invalid(what, "must not be empty"));
        }
    }
    Ok(settings)
}
