//! `sdv-provision`: give an Eclipse Leda vehicle computer its Azure IoT identity.
//!
//! Data flows one way: `commands` → `identity` → (`keystore`, `cert`, `manifest`,
//! `device_id`, `cloud`, `connector`) → (`fsutil`, `paths`, `error`).

pub mod cert;
pub mod cloud;
pub mod device_id;
pub mod dps;
pub mod error;
pub mod fsutil;
pub mod inroot;
pub mod keystore;
pub mod manifest;
pub mod model;
pub mod paths;
pub mod process;

pub use error::{Error, Result};
pub mod cli;
pub mod commands;
pub mod connector;
pub mod console;
pub mod identity;
pub mod interactive;
pub mod output;
pub mod progress;
pub mod secret_modes;
pub mod txn;

/// Find a program on PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(program))
        .find(|p| p.is_file())
}
