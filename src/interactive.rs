//! Prompts for what is missing, on a terminal. They fill the same values the flags
//! do; nothing downstream knows which way an answer came.

use dialoguer::{theme::SimpleTheme, Password, Select};

use crate::cloud::{check_id_scope, Cloud, ConnectionString};
use crate::error::Result;
use crate::output::Out;

/// Ask for the cloud backend, with the original script's wording. Bad input re-asks.
pub fn ask_cloud(out: &Out, device_id: &str) -> Result<Cloud> {
    out.say(" - Neither Id Scope file nor ConnectionString found, needs manual configuration");
    // The question is a line of its own, as in the original script, and the Select
    // prompt is short: dialoguer redraws only the last terminal line of its prompt,
    // so a prompt that wraps was drawn twice once the choice was made. On stderr,
    // where dialoguer draws.
    crate::output::stderr(
        "Do you want to use the global Azure IoT Device Provisioning Service (DPS) by using an Id Scope, \
         or do you want to use a direct connection to a specific Azure IoT Hub using a Connection String?\n",
    );
    let choice = Select::with_theme(&SimpleTheme)
        .with_prompt("Your choice")
        .items(&[
            "d) Azure IoT Device Provisioning Service (DPS) with Id Scope",
            "h) Azure IoT Hub with Connection String",
        ])
        .default(0)
        .interact()?;
    if choice == 0 {
        let scope: String = dialoguer::Input::with_theme(&SimpleTheme)
            .with_prompt("Please enter your Id Scope of the Azure IoT Device Provisioning Service")
            .validate_with(|s: &String| check_id_scope(s.trim()).map(|_| ()))
            .interact_text()?;
        let scope = scope.trim().to_owned();
        if let Ok(Some(w)) = check_id_scope(&scope) {
            out.warn(w);
        }
        Ok(Cloud::Dps { id_scope: scope })
    } else {
        // Hidden input: the string may carry a SharedAccessKey, which must not end up
        // in the terminal's scrollback.
        let dev = device_id.to_owned();
        let cs = Password::with_theme(&SimpleTheme)
            .with_prompt(format!(
                "Please enter the Connection String of the device {dev} (input is hidden)"
            ))
            .validate_with(move |s: &String| -> std::result::Result<(), String> {
                let cs = ConnectionString::parse(s.trim())?;
                if cs.device_id != dev {
                    return Err(format!(
                        "its DeviceId {} is not this device's id {dev}",
                        cs.device_id
                    ));
                }
                Ok(())
            })
            .interact()?;
        let cs = zeroize::Zeroizing::new(cs);
        Ok(Cloud::Hub(
            ConnectionString::parse(cs.trim()).expect("validated above"),
        ))
    }
}

/// Ask a yes/no question (default no).
pub fn confirm(prompt: &str) -> Result<bool> {
    Ok(dialoguer::Confirm::with_theme(&SimpleTheme)
        .with_prompt(prompt)
        .default(false)
        .interact()?)
}
