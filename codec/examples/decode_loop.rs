//! Profiling aid: decodes the sample 0100 in a loop (`perf record` on this binary).
#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]
fn main() {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "iso87-ascii".into());
    let d = cardswitch_codec::Dialect::builtin(&name).unwrap();
    let wire = d
        .encode_to_vec(&cardswitch_codec::sample::auth_request())
        .unwrap();
    let mut n = 0usize;
    let start = std::time::Instant::now();
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let reuse = std::env::var("REUSE").is_ok();
    let mut msg = cardswitch_codec::Message::new(cardswitch_codec::Mti::AUTH_REQUEST);
    for _ in 0..iters {
        if reuse {
            d.decode_into(std::hint::black_box(&wire), &mut msg)
                .unwrap();
            n += msg.len();
        } else {
            n += d.decode(std::hint::black_box(&wire)).unwrap().len();
        }
    }
    eprintln!(
        "{name}: {:.1} ns/decode ({n})",
        start.elapsed().as_nanos() as f64 / iters as f64
    );
}
