//! What every decode target checks: no panic on any input, and whatever decodes survives an
//! encode and a second decode unchanged (messages compared field by field). The parsed DE55 and
//! the masked description are exercised too.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cardswitch_codec::Dialect;

fn dialect(name: &'static str) -> Dialect {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Dialect>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().expect("fuzz cache lock");
    map.entry(name).or_insert_with(|| Dialect::builtin(name).expect("shipped dialect")).clone()
}

/// Decodes `data` in the named dialect and checks the round trip.
pub fn check_decode(name: &'static str, data: &[u8]) {
    let d = dialect(name);
    let Ok(msg) = d.decode(data) else { return };
    let wire = d.encode_to_vec(&msg).expect("a decoded message encodes");
    let again = d.decode(&wire).expect("an encoded message decodes");
    assert_eq!(again, msg, "round trip changed the message");
    let _ = msg.icc_data();
    let _ = msg.describe(&d);
    let _ = msg.response();
}
