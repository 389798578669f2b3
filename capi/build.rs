//! Generates the C header from the crate's `extern "C"` items into `$OUT_DIR/coordgen.h`;
//! the committed `include/coordgen.h` is what C programs include, and a test asserts the
//! two are equal, so the header cannot drift from the code.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("coordgen.h");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("capi/cbindgen.toml");
    // From the source file alone: no `cargo metadata` run from inside the build.
    match cbindgen::Builder::new().with_src(format!("{dir}/src/lib.rs")).with_config(config).generate() {
        Ok(b) => {
            b.write_to_file(&out);
        }
        Err(e) => panic!("cbindgen could not generate the C header: {e}"),
    }
}
