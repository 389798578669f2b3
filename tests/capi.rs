//! The C API from C: `capi/tests/c/embed_test.c` is compiled with the system C compiler
//! against the committed header `capi/include/coordgen.h` and the workspace's
//! `libcoordgen_capi.so`, then run on SmolLM2 with the n-gram drafter. Its own checks
//! cover errors, chat cache reuse, cancelling from the callback and invalid arguments;
//! here its speculative completion is compared with plain greedy decoding in Rust.

use std::path::{Path, PathBuf};
use std::process::Command;

use coordgen::engine::{GenerateParams, Session};
use coordgen_tests::*;

/// Compiles `source` (relative to the repository) against the C API into `dir/name`.
fn compile_c(source: &str, dir: &Path, name: &str) -> PathBuf {
    let lib = plugin_dir();
    assert!(lib.join("libcoordgen_capi.so").is_file(), "build the workspace first (cargo build --workspace)");
    let exe = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(repo_path("capi/include"))
        .arg(repo_path(source))
        .arg("-L")
        .arg(&lib)
        .arg("-lcoordgen_capi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(out.status.success(), "compiling {source} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn c_program_embeds_the_runtime() {
    let dir = temp_dir("capi");
    let exe = compile_c("capi/tests/c/embed_test.c", &dir, "embed_test");

    let cache = format!("cache_dir = \"{}\"", dir.join("cache").display());
    let config = format!(
        "target_backend = \"cpu\"\ndrafter = \"ngram\"\nscheduler = \"fixed\"\n{}{}",
        cpu_entry(2),
        plugin_entry("ngram", "drafter", "coordgen_drafter_ngram", &cache)
    );
    let cfg = dir.join("plugins.toml");
    std::fs::write(&cfg, config).unwrap();
    let model = model_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let run = Command::new(&exe).arg(&cfg).arg(&model).env("COORDGEN_CACHE", dir.join("cache")).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "the C test failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    let text = stdout.split("<<<").nth(1).and_then(|r| r.split(">>>").next()).expect("the completion between markers");

    // Plain greedy decoding of the same prompt, in Rust: the speculative text from C equals it.
    let mut s = Session::open(cpu_backend(2), &model, 1024).unwrap();
    let prompt = s.tok().encode("The three primary colors are", true).unwrap();
    let plain = s.generate(&prompt, &GenerateParams { max_tokens: 24, ..Default::default() }, &mut |_| {}).unwrap();
    assert_eq!(text, plain.text, "C API (n-gram drafter) vs plain greedy");

    // The example program (examples/c-embed) builds and streams a completion.
    let example = compile_c("examples/c-embed/main.c", &dir, "c-embed");
    let run = Command::new(&example).arg("--raw").arg(&cfg).arg(&model).args(["The three primary colors are", "24"]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "c-embed failed:\n{out}\n{err}");
    assert_eq!(out.trim_end(), plain.text.trim_end(), "c-embed's streamed text");
    assert!(err.contains("24 tokens") && err.contains("length"), "{err}");
}
