//! GUIDE_PLACEHOLDER
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

pub mod carry;
mod current;
mod future;
mod local;
mod loom;
mod node;
mod snapshot;
#[cfg(feature = "tokio")]
mod spawn;
pub mod thread;

#[cfg(feature = "futures")]
pub use crate::future::StreamExt;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use crate::spawn::{spawn, spawn_blocking, spawn_detached, spawn_in, spawn_local, spawn_with};
pub use crate::{
    future::{FutureExt, Scope, WithContext},
    local::{AsyncLocal, EnterGuard, Inherit},
    snapshot::Snapshot,
};
