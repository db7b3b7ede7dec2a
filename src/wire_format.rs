//! [`WireFormat`]: a layout of stream entries by name, for configuration files, resolved to
//! its [`Codec`].

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

impl WireFormat {
    /// The codec of this layout; a peer's needs the `interop` feature.
    pub fn codec(self) -> Result<std::sync::Arc<dyn Codec>> {
        match self {
            WireFormat::Streamwise => Ok(std::sync::Arc::new(JsonCodec)),
            #[cfg(feature = "interop")]
            WireFormat::Natricine => Ok(std::sync::Arc::new(crate::interop::NatricineCodec::default())),
            #[cfg(feature = "interop")]
            WireFormat::Watermill => Ok(std::sync::Arc::new(crate::interop::WatermillCodec::default())),
            #[cfg(not(feature = "interop"))]
            WireFormat::Natricine | WireFormat::Watermill => Err(Error::invalid(
                "codec",
                "natricine's and Watermill's layouts need streamwise's interop feature",
            )),
        }
    }
}
