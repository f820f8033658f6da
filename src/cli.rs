//! The command line (clap derive only). `build.rs`-free: the man pages and shell
//! completions are generated from [`Cli::command`] by `examples/gen-assets.rs`
//! (`cargo run --example gen-assets -- DIR`; `scripts/package` packages them).

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use clap::builder::PossibleValue;

use crate::model::{Algorithm, Confirmation, KeystoreKind, Role, Rotation};

// The domain types (crate::model) carry no clap; their flag values are their names.
impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &Role::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

impl clap::ValueEnum for Algorithm {
    fn value_variants<'a>() -> &'a [Self] {
        &Algorithm::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

/// A switch (`--promote`, `--yes`) read as the domain value it stands for: `off`
/// when absent, `on` when given.
fn flag<T>(off: T, on: T) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: Copy + Send + Sync + Clone + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::BoolValueParser::new().map(move |given| if given { on } else { off })
}

/// Give this Eclipse Leda device its Azure IoT identity.
///
/// Without a subcommand, runs `provision`: device id, cloud backend, primary and
/// secondary keys and certificates, thumbprints, connector manifest, restart.
#[derive(Debug, Parser)]
#[command(name = "sdv-provision", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// Flags of `provision`, accepted without the subcommand word too.
    #[command(flatten)]
    pub provision: ProvisionArgs,
}

impl Cli {
    /// The provision flags in effect. Flags may stand before or after the
    /// `provision` word; giving one both ways with different values, or giving
    /// provision flags with another subcommand, is a usage error. Without a cloud
    /// flag, env [`CONNECTION_STRING_ENV`] gives the connection string: it is read
    /// here, not by clap, so an exported value never collides with a flag.
    pub fn provision_args(&self) -> Result<ProvisionArgs, String> {
        let mut args = self.merged_provision_args()?;
        let cloud_flags = [
            args.id_scope.is_some(),
            args.connection_string.is_some(),
            args.connection_string_file.is_some(),
        ]
        .into_iter()
        .filter(|given| *given)
        .count();
        if cloud_flags > 1 {
            // clap checks each side of the `provision` word; this checks both together.
            return Err(
                "--id-scope, --connection-string and --connection-string-file \
                        exclude each other; give one"
                    .into(),
            );
        }
        let provisioning = matches!(self.command, None | Some(Command::Provision(_)));
        if provisioning && cloud_flags == 0 {
            if let Some(v) = std::env::var_os(CONNECTION_STRING_ENV).filter(|v| !v.is_empty()) {
                let v = v
                    .into_string()
                    .map_err(|_| format!("{CONNECTION_STRING_ENV} is not valid UTF-8"))?;
                args.connection_string = Some(v);
            }
        }
        Ok(args)
    }

    fn merged_provision_args(&self) -> Result<ProvisionArgs, String> {
        let top = &self.provision;
        let top_given = top.id_scope.is_some()
            || top.connection_string.is_some()
            || top.connection_string_file.is_some()
            || top.algorithm.is_some()
            || top.device_id.is_some()
            || top.force
            || top.no_register
            || top.days != ProvisionArgs::DEFAULT_DAYS;
        let sub = match &self.command {
            None => return Ok(top.clone()),
            Some(Command::Provision(sub)) => sub,
            Some(Command::Rotate { .. }) if top.days != ProvisionArgs::DEFAULT_DAYS => {
                return Err("--days goes after the subcommand: `sdv-provision rotate --days N`".into())
            }
            Some(_) if top_given => {
                return Err("provision flags (--id-scope, --algorithm, --device-id, ...) only go with `provision`".into())
            }
            Some(_) => return Ok(top.clone()),
        };
        Ok(ProvisionArgs {
            id_scope: pick("--id-scope", &sub.id_scope, &top.id_scope)?,
            connection_string: pick(
                "--connection-string",
                &sub.connection_string,
                &top.connection_string,
            )?,
            connection_string_file: pick(
                "--connection-string-file",
                &sub.connection_string_file,
                &top.connection_string_file,
            )?,
            algorithm: pick("--algorithm", &sub.algorithm, &top.algorithm)?,
            days: if sub.days != ProvisionArgs::DEFAULT_DAYS {
                sub.days
            } else {
                top.days
            },
            device_id: pick("--device-id", &sub.device_id, &top.device_id)?,
            force: sub.force || top.force,
            dps: sub.dps.merge(&top.dps)?,
            no_register: sub.no_register || top.no_register,
        })
    }

    /// The DPS flags of `register`: after the subcommand word, or before it.
    pub fn register_args(&self) -> Result<DpsArgs, String> {
        match &self.command {
            Some(Command::Register(sub)) => sub.merge(&self.provision.dps),
            _ => Ok(self.provision.dps.clone()),
        }
    }
}

/// Where DPS is and whom to trust for it (DESIGN §3b); recorded in the state, so
/// later runs need neither flag.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct DpsArgs {
    /// DPS service endpoint [env: SDV_PROVISION_DPS_ENDPOINT; default: what the
    /// state recorded, else global.azure-devices-provisioning.net].
    #[arg(long, value_name = "HOST[:PORT]")]
    pub dps_endpoint: Option<String>,

    /// PEM file with the CA certificate(s) the DPS server's certificate must chain to,
    /// instead of the system roots (private clouds, tests) [env:
    /// SDV_PROVISION_DPS_CA_FILE; default: what the state recorded].
    #[arg(long, value_name = "FILE")]
    pub dps_ca_file: Option<PathBuf>,
}

/// A flag given on both sides of the `provision` word: the same value twice is fine,
/// two different values are a usage error.
fn pick<T: Clone + PartialEq>(
    name: &str,
    a: &Option<T>,
    b: &Option<T>,
) -> Result<Option<T>, String> {
    match (a, b) {
        (Some(x), Some(y)) if x != y => Err(format!("{name} is given twice with different values")),
        _ => Ok(a.clone().or_else(|| b.clone())),
    }
}

impl DpsArgs {
    fn merge(&self, other: &DpsArgs) -> Result<DpsArgs, String> {
        Ok(DpsArgs {
            dps_endpoint: pick("--dps-endpoint", &self.dps_endpoint, &other.dps_endpoint)?,
            dps_ca_file: pick("--dps-ca-file", &self.dps_ca_file, &other.dps_ca_file)?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeystoreChoice {
    /// TPM if present, else PKCS#11 if a module is configured, else files.
    Auto,
    Tpm,
    Pkcs11,
    File,
}

impl KeystoreChoice {
    /// The keystore chosen, or `None` for `auto` (decided once the config is known).
    pub fn kind(self) -> Option<KeystoreKind> {
        match self {
            KeystoreChoice::Auto => None,
            KeystoreChoice::Tpm => Some(KeystoreKind::Tpm),
            KeystoreChoice::Pkcs11 => Some(KeystoreKind::Pkcs11),
            KeystoreChoice::File => Some(KeystoreKind::File),
        }
    }
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Prefix for every path the tool reads or writes (scratch trees, image builds).
    #[arg(
        long,
        global = true,
        env = "SDV_PROVISION_ROOT",
        default_value = "/",
        value_name = "DIR"
    )]
    pub root: PathBuf,

    /// Where device keys are generated and kept.
    #[arg(long, global = true, value_enum, default_value_t = KeystoreChoice::Auto)]
    pub keystore: KeystoreChoice,

    /// Print exactly one JSON document on stdout, nothing else.
    #[arg(long, global = true)]
    pub json: bool,

    /// Never prompt (also implied when stdin is not a terminal).
    #[arg(long, global = true)]
    pub non_interactive: bool,

    /// Do not stop, recreate or restart the cloud connector container.
    #[arg(long, global = true)]
    pub no_restart: bool,

    /// TPM TCTI, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`
    /// [env: TPM2TOOLS_TCTI, TCTI; default: device:/dev/tpmrm0]
    #[arg(long, global = true, value_name = "TCTI")]
    pub tcti: Option<String>,

    /// Persistent handle for the primary TPM key [default: 0x81000010].
    #[arg(long, global = true, value_name = "HANDLE", value_parser = parse_handle)]
    pub tpm_primary_handle: Option<u32>,

    /// Persistent handle for the secondary TPM key [default: 0x81000011].
    #[arg(long, global = true, value_name = "HANDLE", value_parser = parse_handle)]
    pub tpm_secondary_handle: Option<u32>,

    /// PKCS#11 module (shared library).
    #[arg(long, global = true, env = "PKCS11_MODULE_PATH", value_name = "FILE")]
    pub pkcs11_module: Option<PathBuf>,

    /// Label of the PKCS#11 token [default: leda].
    #[arg(long, global = true, value_name = "LABEL")]
    pub pkcs11_token: Option<String>,

    /// File holding the token's user PIN (else env SDV_PROVISION_PKCS11_PIN, else a
    /// hidden prompt). PINs are never taken from the command line.
    #[arg(long, global = true, value_name = "FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,

    /// Initialise an uninitialised token slot with --pkcs11-token's label (SO PIN from
    /// env SDV_PROVISION_PKCS11_SO_PIN or the file in SDV_PROVISION_PKCS11_SO_PIN_FILE).
    #[arg(long, global = true)]
    pub pkcs11_init_token: bool,

    /// More logging on stderr (-v: steps and timings, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Provision the device (the default).
    Provision(ProvisionArgs),
    /// Print what is configured; exit 0 if complete, 1 if not.
    Status,
    /// Prove every key signs and matches its certificate, and the manifest agrees.
    Verify,
    /// Make a new secondary key and certificate; --promote swaps it into primary.
    Rotate {
        /// Make the secondary the primary (manifest updated, connector restarted),
        /// remove the old primary, then create a fresh secondary (register its
        /// thumbprint).
        #[arg(long, action = ArgAction::SetTrue, value_parser = flag(Rotation::NewSecondary, Rotation::Promote))]
        promote: Rotation,
        /// Validity of the new secondary certificate, in days.
        #[arg(long, default_value_t = ProvisionArgs::DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
    },
    /// Write a PKCS#10 request for a role's key, signed through the key.
    Csr {
        #[arg(long, value_enum)]
        role: Role,
        /// Output file (PEM); stdout if absent.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Install a CA-issued certificate (with its chain) for a role.
    ImportCert {
        #[arg(long, value_enum)]
        role: Role,
        /// PEM file: the certificate, then its chain.
        file: PathBuf,
    },
    /// Register with DPS through the device key (TLS client certificate = the primary);
    /// records the assigned hub. Changes nothing on disk when it fails.
    Register(DpsArgs),
    /// Remove the identity: certificates, keys, token objects, TPM handles, manifest entries.
    Reset {
        /// Do not ask for confirmation (required when not on a terminal).
        #[arg(long, action = ArgAction::SetTrue, value_parser = flag(Confirmation::Ask, Confirmation::Given))]
        yes: Confirmation,
    },
}

/// The Hub connection string, when no cloud flag is given (keeps the SharedAccessKey
/// out of argv).
pub const CONNECTION_STRING_ENV: &str = "SDV_PROVISION_CONNECTION_STRING";

#[derive(Debug, Clone, Default, Args)]
pub struct ProvisionArgs {
    /// Azure DPS ID scope (DPS backend).
    #[arg(long, value_name = "SCOPE", conflicts_with_all = ["connection_string", "connection_string_file"])]
    pub id_scope: Option<String>,

    /// Azure IoT Hub device connection string (Hub backend). A SharedAccessKey on the
    /// command line is visible to other local users; prefer
    /// --connection-string-file or env SDV_PROVISION_CONNECTION_STRING (used when no
    /// --id-scope, --connection-string or --connection-string-file is given).
    #[arg(long, value_name = "STRING", conflicts_with = "connection_string_file")]
    pub connection_string: Option<String>,

    /// Read the Hub connection string from a file.
    #[arg(long, value_name = "FILE")]
    pub connection_string_file: Option<PathBuf>,

    /// Key algorithm [default: rsa-2048, what today's connector signs with].
    #[arg(long, value_enum)]
    pub algorithm: Option<Algorithm>,

    /// Certificate validity in days.
    #[arg(long, default_value_t = ProvisionArgs::DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,

    /// Device id (certificate CN, Hub device id, DPS registration id).
    #[arg(long, value_name = "ID")]
    pub device_id: Option<String>,

    /// Build a new identity even if one exists; the old keys are removed only after
    /// the new ones are in place.
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub dps: DpsArgs,

    /// With DPS and a TPM or PKCS#11 key, do not register at the end (run
    /// `sdv-provision register` later).
    #[arg(long)]
    pub no_register: bool,
}

impl ProvisionArgs {
    pub const DEFAULT_DAYS: u32 = 365;
}

fn parse_handle(s: &str) -> Result<u32, String> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or("write the handle in hex, e.g. 0x81000010")?;
    let v = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
    if !(0x8100_0000..=0x817f_ffff).contains(&v) {
        return Err("not an owner-hierarchy persistent handle (0x81000000-0x817fffff)".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn switches_read_as_what_they_ask_for() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap().command;
        assert!(matches!(
            parse(&["sdv-provision", "rotate"]),
            Some(Command::Rotate {
                promote: Rotation::NewSecondary,
                ..
            })
        ));
        assert!(matches!(
            parse(&["sdv-provision", "rotate", "--promote"]),
            Some(Command::Rotate {
                promote: Rotation::Promote,
                ..
            })
        ));
        assert!(matches!(
            parse(&["sdv-provision", "reset"]),
            Some(Command::Reset {
                yes: Confirmation::Ask
            })
        ));
        assert!(matches!(
            parse(&["sdv-provision", "reset", "--yes"]),
            Some(Command::Reset {
                yes: Confirmation::Given
            })
        ));
        assert!(Cli::try_parse_from(["sdv-provision", "reset", "--yes=maybe"]).is_err());
    }

    #[test]
    fn provision_flags_work_with_and_without_subcommand() {
        let a = Cli::try_parse_from(["sdv-provision", "--id-scope", "x", "--no-restart"]).unwrap();
        assert!(a.command.is_none());
        assert_eq!(a.provision.id_scope.as_deref(), Some("x"));
        let b = Cli::try_parse_from(["sdv-provision", "--json", "provision", "--id-scope", "x"])
            .unwrap();
        assert_eq!(b.provision_args().unwrap().id_scope.as_deref(), Some("x"));
        assert!(b.global.json);
        let c =
            Cli::try_parse_from(["sdv-provision", "status", "--root", "/tmp", "--json"]).unwrap();
        assert!(matches!(c.command, Some(Command::Status)));
        let d = Cli::try_parse_from(["sdv-provision", "--id-scope", "x", "status"]).unwrap();
        assert!(d.provision_args().is_err());
        let e = Cli::try_parse_from([
            "sdv-provision",
            "--algorithm",
            "ecdsa-p256",
            "provision",
            "--id-scope",
            "x",
        ])
        .unwrap();
        let a = e.provision_args().unwrap();
        assert_eq!(
            (a.algorithm, a.id_scope.as_deref()),
            (Some(Algorithm::EcdsaP256), Some("x"))
        );
        let f = Cli::try_parse_from([
            "sdv-provision",
            "--device-id",
            "a",
            "provision",
            "--device-id",
            "b",
        ])
        .unwrap();
        assert!(f.provision_args().is_err());
        assert!(Cli::try_parse_from([
            "sdv-provision",
            "--id-scope",
            "x",
            "--connection-string",
            "y"
        ])
        .is_err());
    }

    #[test]
    fn handles() {
        assert_eq!(parse_handle("0x81000010"), Ok(0x8100_0010));
        assert!(parse_handle("81000010").is_err());
        assert!(parse_handle("0x01000010").is_err());
    }
}
