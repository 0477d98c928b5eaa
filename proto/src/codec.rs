//! The protobuf codec of every generated client and server (REL-1, REL-5).
//!
//! It is tonic-prost's codec with one difference: a message that cannot be
//! decoded (bad bytes, a wrong wire type, nesting past prost's recursion
//! limit of 100) is INVALID_ARGUMENT with a `google.rpc.ErrorInfo`
//! (reason `MALFORMED_MESSAGE`), not the INTERNAL tonic-prost answers. On a
//! server that is always the client's mistake (SPEC 3: never INTERNAL for
//! one); a client decoding a response gets the same code for a server's.

use std::collections::HashMap;
use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.reason` of an undecodable message.
pub const MALFORMED_MESSAGE: &str = "MALFORMED_MESSAGE";

/// The INVALID_ARGUMENT status of an undecodable message (error domain "crm").
pub fn malformed(detail: impl std::fmt::Display) -> Status {
    malformed_in("crm", format!("the message could not be decoded as the method's request type: {detail}"))
}

/// INVALID_ARGUMENT with reason `MALFORMED_MESSAGE` in error domain `domain`.
pub fn malformed_in(domain: &str, message: impl Into<String>) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(MALFORMED_MESSAGE, domain, HashMap::new());
    Status::with_error_details(tonic::Code::InvalidArgument, message, details)
}

/// tonic-prost's codec, with decode failures answered as client mistakes.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder { inner: ProstCodec::<T, U>::default().decoder() }
    }
}

/// Decodes `U`; a decode error is [`malformed`].
#[derive(Debug, Clone)]
pub struct MessageDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost reports the error text; tonic-prost would wrap it as INTERNAL.
        U::decode(buf).map(Some).map_err(malformed)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
