//! Alibaba Serverless App Engine: the ACS3 signer, the OSS upload and the deploy that follows
//! the change order.

pub(crate) mod client;
pub(crate) mod deploy;
pub mod oss;
pub mod signer;

pub use client::ClientError;
pub use deploy::SaeError;
