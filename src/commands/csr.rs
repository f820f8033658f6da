//! `csr`: a PKCS#10 request for a role's existing key, signed through the key. Lets a
//! fleet use DPS enrollment groups with CA-issued certificates instead of per-device
//! thumbprints.

use std::path::Path;

use crate::error::Result;
use crate::fsutil;
use crate::identity::Identity;
use crate::keystore::Role;

use super::{existing_state, Ctx};

pub fn run(ctx: &Ctx, role: Role, out: Option<&Path>) -> Result<i32> {
    ctx.check_root()?;
    let id = Identity::load(&ctx.layout)?;
    let state = existing_state(&id)?;
    let uri = state.keys.get(&role).ok_or_else(|| {
        crate::Error::input(
            format!("there is no {role} key"),
            crate::error::Fix::CompleteIdentity,
        )
    })?;
    let mut ks = ctx.open_keystore_to_read(state.keystore, Some(&state))?;
    let key = ks.open(uri)?;
    let pem = crate::cert::csr(key.as_ref(), &state.device_id)?;
    match out {
        Some(path) => {
            fsutil::atomic_write(path, pem.as_bytes(), fsutil::PUBLIC)?;
            if ctx.json {
                crate::output::stdout(&format!(
                    "{}\n",
                    serde_json::json!({"role": role.as_str(), "path": path.display().to_string(), "key_uri": crate::output::host_uri(&ctx.layout, uri)})
                ));
            } else {
                ctx.out.say(format!(
                    "Wrote the {role} certificate request to {}",
                    path.display()
                ));
            }
        }
        None if ctx.json => {
            crate::output::stdout(&format!(
                "{}\n",
                serde_json::json!({"role": role.as_str(), "csr": pem, "key_uri": crate::output::host_uri(&ctx.layout, uri)})
            ));
        }
        None => {
            crate::output::stdout(&pem);
        }
    }
    Ok(0)
}
