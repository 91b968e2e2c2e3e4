//! GUIDE_PLACEHOLDER
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod current;
mod future;
mod loom;
mod local;
mod node;
mod snapshot;
#[cfg(feature = "tokio")]
mod spawn;
pub mod thread;

pub use crate::{
    future::{FutureExt, Scope, WithContext},
    local::{AsyncLocal, EnterGuard, Inherit},
    snapshot::Snapshot,
};
#[cfg(feature = "futures")]
pub use crate::future::StreamExt;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use crate::spawn::{spawn, spawn_blocking, spawn_detached, spawn_in, spawn_local, spawn_with};
