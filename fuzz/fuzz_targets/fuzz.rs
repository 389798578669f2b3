//! One libFuzzer binary for every target: `COORDGEN_FUZZ_TARGET` names the parser it feeds
//! (one of `coordgen::fuzz_targets::TARGETS`), so the parsers share one instrumented build.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn target() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| {
        let t = std::env::var("COORDGEN_FUZZ_TARGET").unwrap_or_default();
        if !coordgen::fuzz_targets::TARGETS.contains(&t.as_str()) {
            eprintln!("set COORDGEN_FUZZ_TARGET to one of {:?}", coordgen::fuzz_targets::TARGETS);
            std::process::exit(2);
        }
        t
    })
}

fuzz_target!(|data: &[u8]| {
    coordgen::fuzz_targets::run(target(), data);
});
