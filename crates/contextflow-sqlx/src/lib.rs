//! GUIDE
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod conn;
mod error;
mod pool;
mod state;

pub use crate::{conn::Conn, error::TransactionClosed, pool::TxPool};
