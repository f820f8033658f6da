//! `sdv-provision`: give an Eclipse Leda vehicle computer its Azure IoT identity.
//!
//! Data flows one way: `commands` → `identity` → (`keystore`, `cert`, `manifest`,
//! `device_id`, `cloud`, `connector`) → (`fsutil`, `paths`, `error`).

pub mod cert;
pub mod cloud;
pub mod device_id;
pub mod error;
pub mod fsutil;
pub mod keystore;
pub mod manifest;
pub mod paths;

pub use error::{Error, Result};
