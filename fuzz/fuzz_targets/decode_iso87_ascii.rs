#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cardswitch_fuzz::check_decode("iso87-ascii", data));
