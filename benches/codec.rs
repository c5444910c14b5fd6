//! Decode and encode of a typical 0100 (about 260 bytes, PIN block, 40-byte DE55), side by side
//! with the other ISO 8583 crates on the registry.
//!
//! `cargo bench --bench codec`
//!
//! Both baselines only read hex bitmaps, so they are measured on the exact bytes our
//! `iso87-ascii-hexbitmap` dialect writes: each is given a spec with the same layout (DE52 and DE55
//! as hex text), and the setup checks that each reads every field to the same value before any
//! timing starts. Our codec does more on those bytes than they do: it turns the hex of DE52/DE55
//! into bytes and checks the `z` track data, which both baselines leave unchecked.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout
)] // a benchmark prints

use std::collections::HashMap;
use std::hint::black_box;

use cardswitch_codec::{sample, Dialect, Format, LengthKind, Message};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};

fn dialect(name: &str) -> Dialect {
    Dialect::builtin(name).unwrap()
}

/// The message as it sits on the wire in the hex-bitmap dialect: each field's wire text.
fn wire_values(d: &Dialect, msg: &Message) -> Vec<(u8, Vec<u8>)> {
    msg.fields()
        .map(|(n, v)| {
            let text = if d.field(n).unwrap().format == Format::B {
                hex::encode_upper(v).into_bytes()
            } else {
                v.to_vec()
            };
            (n, text)
        })
        .collect()
}

fn prefix_name(kind: LengthKind) -> &'static str {
    match kind {
        LengthKind::Fixed => "fixed",
        LengthKind::LL => "llvar",
        LengthKind::LLL => "lllvar",
        _ => "llllvar",
    }
}

/// iso_8583_rs spec with the hex-bitmap dialect's layout for the fields of the message.
fn iso_8583_rs_spec(d: &Dialect, msg: &Message) -> iso_8583_rs::CompiledSpec {
    let mut fields = HashMap::new();
    for n in msg.field_numbers() {
        let f = d.field(n).unwrap();
        let content = match f.format {
            Format::N => "n",
            Format::A => "a",
            Format::An => "an",
            Format::Ans => "ans",
            _ => "b", // not checked by iso_8583_rs
        };
        let max = if f.format == Format::B {
            usize::from(f.length) * 2
        } else {
            usize::from(f.length)
        };
        fields.insert(
            i64::from(n),
            iso_8583_rs::specfile::FieldDescription {
                content_type: content.into(),
                max_len: max,
                min_len: 0,
                len_type: prefix_name(f.kind).into(),
                label: f.name.to_string(),
            },
        );
    }
    iso_8583_rs::CompiledSpec::compile(&iso_8583_rs::specfile::Spec { fields }).unwrap()
}

/// iso8583-codec-rs spec with the same layout.
fn codec_rs_spec(d: &Dialect, msg: &Message) -> iso8583_codec_rs::field_spec::LoadedSpec {
    let fields: Vec<Value> = msg
        .field_numbers()
        .map(|n| {
            let f = d.field(n).unwrap();
            let prefix = match f.kind {
                LengthKind::Fixed => "fixed",
                LengthKind::LL => "LLVAR",
                LengthKind::LLL => "LLLVAR",
                _ => "LLLLVAR",
            };
            let max = if f.format == Format::B { usize::from(f.length) * 2 } else { usize::from(f.length) };
            json!({ "de": n, "name": format!("f{n}"), "type": "string", "length": max, "prefix": prefix,
                    "encoding": "ascii", "padding": { "side": "none" } })
        })
        .collect();
    let spec = json!({ "version": "1987",
        "defaults": { "encoding": "ascii", "prefix_encoding": "ascii", "bitmap_encoding": "hex", "max_bitmaps": 2 },
        "fields": fields });
    iso8583_codec_rs::load_spec(&spec.to_string()).unwrap()
}

fn codec_rs_doc(values: &[(u8, Vec<u8>)]) -> Value {
    let fields: serde_json::Map<String, Value> = values
        .iter()
        .map(|(n, v)| {
            (
                format!("de{n:03}_f{n}"),
                Value::String(String::from_utf8(v.clone()).unwrap()),
            )
        })
        .collect();
    json!({ "mti": "0100", "fields": fields })
}

fn bench(c: &mut Criterion) {
    let msg = sample::auth_request();
    let ascii = dialect("iso87-ascii");
    let bcd = dialect("iso87-bcd");
    let hexd = dialect("iso87-ascii-hexbitmap");
    let ascii_wire = ascii.encode_to_vec(&msg).unwrap();
    let bcd_wire = bcd.encode_to_vec(&msg).unwrap();
    let hex_wire = hexd.encode_to_vec(&msg).unwrap();
    println!(
        "typical 0100: {} fields; iso87-ascii {} bytes, iso87-bcd {} bytes, iso87-ascii-hexbitmap {} bytes",
        msg.len(),
        ascii_wire.len(),
        bcd_wire.len(),
        hex_wire.len()
    );

    // Baselines: same bytes, same fields, checked before timing.
    let values = wire_values(&hexd, &msg);
    let rs_spec = iso_8583_rs_spec(&hexd, &msg);
    let parsed = iso_8583_rs::Message::parse(&rs_spec, &hex_wire).unwrap();
    for (n, v) in &values {
        assert_eq!(
            parsed.get(usize::from(*n)),
            Some(&v[..]),
            "iso_8583_rs DE{n}"
        );
    }
    let mut rs_out = Vec::new();
    {
        let mut b = iso_8583_rs::Builder::new(&rs_spec, b"0100").unwrap();
        for (n, v) in &values {
            b.set(usize::from(*n), v).unwrap();
        }
        b.pack_into(&mut rs_out);
    }
    assert_eq!(rs_out, hex_wire, "iso_8583_rs packs the same bytes");
    let cr_spec = codec_rs_spec(&hexd, &msg);
    let cr_doc = codec_rs_doc(&values);
    let cr_parsed = iso8583_codec_rs::iso8583::parse_bytes(&hex_wire, &cr_spec).unwrap();
    assert_eq!(cr_parsed, cr_doc, "iso8583-codec-rs reads the same fields");
    assert_eq!(
        iso8583_codec_rs::iso8583::publish_bytes(&cr_doc, &cr_spec).unwrap(),
        hex_wire
    );

    let mut g = c.benchmark_group("decode_0100");
    g.bench_function("cardswitch/iso87-ascii", |b| {
        b.iter(|| ascii.decode(black_box(&ascii_wire)).unwrap())
    });
    g.bench_function("cardswitch/iso87-bcd", |b| {
        b.iter(|| bcd.decode(black_box(&bcd_wire)).unwrap())
    });
    g.bench_function("cardswitch/iso87-ascii-hexbitmap", |b| {
        b.iter(|| hexd.decode(black_box(&hex_wire)).unwrap())
    });
    let mut reuse = Message::new(msg.mti());
    g.bench_function("cardswitch/iso87-ascii reused message", |b| {
        b.iter(|| {
            ascii
                .decode_into(black_box(&ascii_wire), &mut reuse)
                .unwrap()
        });
    });
    g.bench_function("cardswitch/iso87-bcd reused message", |b| {
        b.iter(|| bcd.decode_into(black_box(&bcd_wire), &mut reuse).unwrap());
    });
    g.bench_function("cardswitch/iso87-ascii-hexbitmap reused message", |b| {
        b.iter(|| hexd.decode_into(black_box(&hex_wire), &mut reuse).unwrap());
    });
    g.bench_function("iso_8583_rs 0.2.2/hexbitmap (zero-copy)", |b| {
        b.iter(|| {
            iso_8583_rs::Message::parse(&rs_spec, black_box(&hex_wire))
                .unwrap()
                .get(2)
                .map(<[u8]>::len)
        });
    });
    g.bench_function("iso8583-codec-rs 0.1.0/hexbitmap", |b| {
        b.iter(|| iso8583_codec_rs::iso8583::parse_bytes(black_box(&hex_wire), &cr_spec).unwrap());
    });
    g.finish();

    let mut g = c.benchmark_group("encode_0100");
    let mut out = Vec::with_capacity(1024);
    for (name, d) in [
        ("iso87-ascii", &ascii),
        ("iso87-bcd", &bcd),
        ("iso87-ascii-hexbitmap", &hexd),
    ] {
        g.bench_function(format!("cardswitch/{name}"), |b| {
            b.iter(|| {
                out.clear();
                d.encode(black_box(&msg), &mut out).unwrap();
            });
        });
    }
    g.bench_function("iso_8583_rs 0.2.2/hexbitmap (set + pack)", |b| {
        b.iter(|| {
            let mut builder = iso_8583_rs::Builder::new(&rs_spec, b"0100").unwrap();
            for (n, v) in &values {
                builder.set(usize::from(*n), black_box(v)).unwrap();
            }
            builder.pack_into(&mut rs_out);
        });
    });
    g.bench_function("iso8583-codec-rs 0.1.0/hexbitmap", |b| {
        b.iter(|| iso8583_codec_rs::iso8583::publish_bytes(black_box(&cr_doc), &cr_spec).unwrap());
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
