//! Command-line shape, kept stable and documented in README.md.

use clap::{Args, Parser, Subcommand};

use cardswitch_codec::framing::LengthPrefix;

/// cardswitch: an ISO 8583 card switch.
#[derive(Debug, Parser)]
#[command(name = "cardswitch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode one message from hex and print its fields, card data masked.
    Decode(DecodeArgs),
    /// Encode a message from JSON (the shape `decode --json` prints) and print it as hex.
    Encode(EncodeArgs),
    /// List the shipped dialects, or validate dialect files.
    Dialects(DialectsArgs),
}

/// Options shared by decode and encode.
#[derive(Debug, Args)]
pub struct WireArgs {
    /// Dialect: a shipped name (see `cardswitch dialects`) or a path to a .toml file.
    #[arg(long, short, default_value = cardswitch_codec::DEFAULT_DIALECT)]
    pub dialect: String,
    /// The hex includes (decode) or should include (encode) the transport length prefix.
    #[arg(long)]
    pub framed: bool,
    /// Length prefix used with --framed: bin2, bin4, ascii4, bcd2, hex4.
    #[arg(long, default_value = "bin2")]
    pub framing: LengthPrefix,
    /// With --framed: a 5-byte TPDU follows the length prefix.
    #[arg(long)]
    pub tpdu: bool,
}

/// `cardswitch decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub wire: WireArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The input is the message itself as text (an all-ASCII dialect), not hex.
    #[arg(long)]
    pub text: bool,
    /// The message in hex, or `-` to read it from standard input (whitespace ignored).
    pub input: String,
}

/// `cardswitch encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub wire: WireArgs,
    /// A JSON file, or `-` (the default) for standard input.
    #[arg(default_value = "-")]
    pub input: String,
}

/// `cardswitch dialects`.
#[derive(Debug, Args)]
pub struct DialectsArgs {
    /// Dialect files to validate; without any, the shipped dialects are listed.
    pub files: Vec<std::path::PathBuf>,
}
