//! Tester tools: `cardswitch decode`, `encode` and `dialects`.
//!
//! Output never holds card data in clear: the field table and the JSON both come from
//! [`Message::describe`], which masks by type. `encode` refuses a masked value instead of sending
//! asterisks to a host.

use std::io::{BufRead, Write};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use serde_json::{json, Map, Value};
use tokio_util::codec::{Decoder, Encoder};

use cardswitch_codec::framing::{Frame, FrameCodec, Framing, Tpdu};
use cardswitch_codec::{default_sensitivity, tlv, Dialect, Format, Message, Mti, BUILTIN_DIALECTS};

use clap::Args;

use cardswitch_codec::framing::LengthPrefix;

/// Options shared by decode and encode.
#[derive(Debug, Args)]
pub(crate) struct WireArgs {
    /// Dialect: a shipped name (see `cardswitch dialects`) or a path to a .toml file.
    #[arg(long, short, default_value = cardswitch_codec::DEFAULT_DIALECT)]
    pub(crate) dialect: String,
    /// The hex includes (decode) or should include (encode) the transport length prefix.
    #[arg(long)]
    pub(crate) framed: bool,
    /// Length prefix used with --framed: bin2, bin4, ascii4, bcd2, hex4.
    #[arg(long, default_value = "bin2")]
    pub(crate) framing: LengthPrefix,
    /// With --framed: a 5-byte TPDU follows the length prefix.
    #[arg(long)]
    pub(crate) tpdu: bool,
}

/// `cardswitch decode`.
#[derive(Debug, Args)]
pub(crate) struct DecodeArgs {
    #[command(flatten)]
    pub(crate) wire: WireArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// The input is the message itself as text (an all-ASCII dialect), not hex.
    #[arg(long)]
    pub(crate) text: bool,
    /// The message in hex, or `-` to read it from standard input (whitespace ignored).
    pub(crate) input: String,
}

/// `cardswitch encode`.
#[derive(Debug, Args)]
pub(crate) struct EncodeArgs {
    #[command(flatten)]
    pub(crate) wire: WireArgs,
    /// A JSON file, or `-` (the default) for standard input.
    #[arg(default_value = "-")]
    pub(crate) input: String,
}

/// `cardswitch dialects`.
#[derive(Debug, Args)]
pub(crate) struct DialectsArgs {
    /// Dialect files to validate; without any, the shipped dialects are listed.
    pub(crate) files: Vec<std::path::PathBuf>,
}

fn framing(args: &WireArgs) -> Framing {
    Framing {
        tpdu: args.tpdu,
        ..Framing::with_prefix(args.framing)
    }
}

fn read_input(arg: &str, text_input: bool, stdin: &mut dyn BufRead) -> Result<Vec<u8>> {
    let text = if arg == "-" {
        let mut s = String::new();
        stdin
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        arg.to_owned()
    };
    if text_input {
        return Ok(text.trim_end_matches(['\r', '\n']).as_bytes().to_vec());
    }
    let compact: String = text.split_whitespace().collect();
    hex::decode(&compact).map_err(|e| anyhow!("input is not hex: {e}"))
}

/// `cardswitch decode`.
///
/// # Errors
/// One line naming the problem: bad hex, a bad frame, or the decode error (element and offset).
pub(crate) fn decode(
    args: &DecodeArgs,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<()> {
    let dialect = Dialect::load(&args.wire.dialect)?;
    let bytes = read_input(&args.input, args.text, stdin)?;
    let (tpdu, body) = if args.wire.framed {
        let mut codec = FrameCodec::new(framing(&args.wire));
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = codec
            .decode(&mut buf)?
            .ok_or_else(|| anyhow!("incomplete frame ({} bytes)", bytes.len()))?;
        if !buf.is_empty() {
            bail!("{} bytes after the frame", buf.len());
        }
        (frame.tpdu, frame.body.to_vec())
    } else {
        (None, bytes)
    };
    let msg = dialect.decode(&body)?;
    if args.json {
        let fields: Map<String, Value> = msg
            .describe(&dialect)
            .into_iter()
            .map(|v| {
                // ICC data without card tags is shown as plain hex so that it can be encoded back.
                let value = match (v.number, msg.get(v.number).map(tlv::parse)) {
                    (55, Some(Ok(tlvs))) if !tlvs.iter().any(tlv::Tlv::is_sensitive) => {
                        hex::encode_upper(msg.get(55).unwrap_or_default())
                    }
                    _ => v.value,
                };
                (v.number.to_string(), Value::String(value))
            })
            .collect();
        let mut doc =
            json!({ "dialect": dialect.name(), "mti": msg.mti().as_str(), "fields": fields });
        if let (Some(t), Some(obj)) = (tpdu, doc.as_object_mut()) {
            obj.insert("tpdu".into(), Value::String(hex::encode_upper(t.0)));
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        writeln!(out, "dialect  {}", dialect.name())?;
        if let Some(t) = tpdu {
            writeln!(out, "TPDU     {}", hex::encode_upper(t.0))?;
        }
        writeln!(out, "MTI      {}", msg.mti())?;
        for v in msg.describe(&dialect) {
            let de = format!("DE{}", v.number);
            writeln!(
                out,
                "{de:<6} {:<4} {:>4}  {:<38} {}",
                v.format, v.length, v.name, v.value
            )?;
        }
    }
    Ok(())
}

/// `cardswitch encode`.
///
/// # Errors
/// One line naming the problem: bad JSON, an unknown field, a masked or invalid value.
pub(crate) fn encode(
    args: &EncodeArgs,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<()> {
    let dialect = Dialect::load(&args.wire.dialect)?;
    let text = if args.input == "-" {
        let mut s = String::new();
        stdin
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input))?
    };
    let doc: Value = serde_json::from_str(&text).context("input is not JSON")?;
    let mti: Mti = doc
        .get("mti")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("`mti` must be a string of four digits"))?
        .parse()
        .map_err(|_| anyhow!("`mti` must be four digits"))?;
    let mut msg = Message::new(mti);
    let fields = doc
        .get("fields")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("`fields` must be an object"))?;
    for (key, value) in fields {
        let number: u8 = key
            .parse()
            .map_err(|_| anyhow!("field key {key:?} is not a field number"))?;
        let value = value
            .as_str()
            .ok_or_else(|| anyhow!("DE{number}: value must be a string"))?;
        let spec = dialect
            .field(number)
            .ok_or_else(|| anyhow!("DE{number}: not defined in dialect {}", dialect.name()))?;
        let sensitive = default_sensitivity(number).or(spec.sensitive).is_some();
        if sensitive && (value.contains('*') || value.contains("[masked")) {
            bail!("DE{number} holds a masked value; give the clear test value to encode it");
        }
        let bytes = if spec.format == Format::B {
            hex::decode(value).map_err(|e| anyhow!("DE{number}: binary value must be hex ({e})"))?
        } else {
            value.as_bytes().to_vec()
        };
        msg.set(number, &bytes);
    }
    let body = dialect.encode_to_vec(&msg)?;
    let wire = if args.wire.framed {
        let tpdu = match doc.get("tpdu").and_then(Value::as_str) {
            Some(h) => {
                let raw: [u8; 5] = hex::decode(h)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| anyhow!("`tpdu` must be 10 hex characters"))?;
                Some(Tpdu(raw))
            }
            None => None,
        };
        let mut buf = BytesMut::new();
        FrameCodec::new(framing(&args.wire)).encode(
            Frame {
                tpdu,
                body: body.into(),
            },
            &mut buf,
        )?;
        buf.to_vec()
    } else {
        body
    };
    writeln!(out, "{}", hex::encode_upper(wire))?;
    Ok(())
}

/// `cardswitch dialects`.
///
/// # Errors
/// The first file that does not validate, with the field and the problem.
pub(crate) fn dialects(args: &DialectsArgs, out: &mut dyn Write) -> Result<()> {
    if args.files.is_empty() {
        for (name, _) in BUILTIN_DIALECTS {
            let d = Dialect::builtin(name)?;
            writeln!(out, "{name:<24} {}", d.description())?;
        }
        return Ok(());
    }
    for path in &args.files {
        let d = Dialect::from_file(path)?;
        writeln!(
            out,
            "{}: ok ({}, {} fields)",
            path.display(),
            d.name(),
            d.fields().count()
        )?;
    }
    Ok(())
}
