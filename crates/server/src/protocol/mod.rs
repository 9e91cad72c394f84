//! OpenAI's API as typed structs: what clients send ([`request`], checked by
//! [`crate::parse`] from the loosely typed [`wire`] shapes) and what the server answers
//! ([`response`]).

pub mod request;
pub mod response;
pub(crate) mod wire;
