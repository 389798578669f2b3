//! The C API from C: `capi/tests/c/embed_test.c` is compiled with the system C compiler
//! against the committed header `capi/include/coordgen.h` and the workspace's
//! `libcoordgen_capi.so`, then run on SmolLM2 with the n-gram drafter. Its own checks
//! cover errors, chat cache reuse, cancelling from the callback and invalid arguments;
//! here its speculative completion is compared with plain greedy decoding in Rust.

use std::path::{Path, PathBuf};
use std::process::Command;

use coordgen::engine::{GenerateParams, Session};
use coordgen_tests::*;

/// Compiles `source` (relative to the repository) against the C API into `dir/name`,
/// linked with the shared library, or with the static one when `static_lib`.
fn compile_c(source: &str, dir: &Path, name: &str, static_lib: bool) -> PathBuf {
    let lib = plugin_dir();
    assert!(lib.join("libcoordgen_capi.so").is_file(), "build the workspace first (cargo build --workspace)");
    let exe = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = Command::new(&cc);
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"]).arg(repo_path("capi/include")).arg(repo_path(source));
    if static_lib {
        cmd.arg(lib.join("libcoordgen_capi.a")).args(["-lpthread", "-ldl", "-lm"]);
    } else {
        cmd.arg("-L").arg(&lib).arg("-lcoordgen_capi").arg(format!("-Wl,-rpath,{}", lib.display()));
    }
    let out = cmd.arg("-o").arg(&exe).output().unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(out.status.success(), "compiling {source} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn c_program_embeds_the_runtime() {
    let dir = temp_dir("capi");
    let exe = compile_c("capi/tests/c/embed_test.c", &dir, "embed_test", false);

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

    // The example program (examples/c-embed) builds, against the shared and against the
    // static library, and streams the same completion.
    for static_lib in [false, true] {
        let example = compile_c("examples/c-embed/main.c", &dir, if static_lib { "c-embed-static" } else { "c-embed" }, static_lib);
        let run = Command::new(&example).arg("--raw").arg(&cfg).arg(&model).args(["The three primary colors are", "24"]).output().unwrap();
        let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        assert!(run.status.success(), "c-embed (static: {static_lib}) failed:\n{out}\n{err}");
        assert_eq!(out.trim_end(), plain.text.trim_end(), "c-embed's streamed text (static: {static_lib})");
        assert!(err.contains("24 tokens") && err.contains("length"), "{err}");
    }
}

/// The Rust embedding example (`examples/cpu-generate`), run with a config that names the
/// n-gram drafter, streams the chat answer plain greedy decoding gives.
#[test]
fn rust_example_streams_the_plain_greedy_answer() {
    let dir = temp_dir("cpu-generate");
    let cache = format!("cache_dir = \"{}\"", dir.join("cache").display());
    let config = format!("target_backend = \"cpu\"\ndrafter = \"ngram\"\n{}{}", cpu_entry(2), plugin_entry("ngram", "drafter", "coordgen_drafter_ngram", &cache));
    let cfg = dir.join("plugins.toml");
    std::fs::write(&cfg, config).unwrap();
    let model = model_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let question = "Name three prime numbers and say why each is prime.";
    let run = Command::new(plugin_dir().join("cpu-generate")).arg(&model).arg(question).arg("2").env("COORDGEN_CONFIG", &cfg).env("COORDGEN_CACHE", dir.join("cache")).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "cpu-generate failed:\n{out}\n{err}");
    assert!(err.contains("speculative decoding"), "the config's drafter was not attached: {err}");

    let mut s = Session::open(cpu_backend(2), &model, 4096).unwrap();
    let text = s.render_chat(&[coordgen::chat::Message::new("user", question)], true).unwrap();
    let prompt = s.tok().encode(&text, true).unwrap();
    let plain = s.generate(&prompt, &GenerateParams { max_tokens: 128, ..Default::default() }, &mut |_| {}).unwrap();
    assert_eq!(out.trim_end(), plain.text.trim_end(), "cpu-generate (n-gram drafter) vs plain greedy");
}

/// The Android example's JNI glue (`examples/android-jni`), loaded into a JVM through a Java
/// stand-in with the Kotlin class's native methods: a missing model throws with CoordGen's
/// message, a chat reply streams to the callback and equals the Rust session's greedy
/// reply, and a callback returning false cancels. Needs `javac`/`java` (on the development
/// and CI machines); without them the test says so and checks nothing.
#[test]
fn jni_glue_runs_in_a_jvm() {
    if Command::new("javac").arg("-version").output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("jni_glue_runs_in_a_jvm: no javac on this machine; the JNI glue was not run");
        return;
    }
    let lib = plugin_dir();
    assert!(lib.join("libcoordgen_jni.so").is_file(), "build the workspace first (cargo build --workspace)");
    let dir = temp_dir("jni");
    let classes = dir.join("classes");
    let src = repo_path("examples/android-jni/jvm-check/dev/coordgen");
    let out = Command::new("javac").arg("-d").arg(&classes).arg(src.join("TextCallback.java")).arg(src.join("CoordGen.java")).output().unwrap();
    assert!(out.status.success(), "javac: {}", String::from_utf8_lossy(&out.stderr));
    let cfg = dir.join("plugins.toml");
    std::fs::write(&cfg, format!("target_backend = \"cpu\"\n{}", cpu_entry(2))).unwrap();
    let model = model_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let run = Command::new("java")
        .arg(format!("-Djava.library.path={}", lib.display()))
        .arg("-cp")
        .arg(&classes)
        .arg("dev.coordgen.CoordGen")
        .arg(&cfg)
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "java failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("missing model: ") && stdout.contains("not found"), "{stdout}");
    assert!(stdout.contains("\"generated_tokens\":16") || stdout.contains("\"finish\":\"stop\""), "{stdout}");
    assert!(stdout.contains("\"finish\":\"cancelled\""), "{stdout}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    let reply = stdout.split("<<<").nth(1).and_then(|r| r.split(">>>").next()).unwrap();

    let mut s = Session::open(cpu_backend(2), &model, 1024).unwrap();
    let text = s.render_chat(&[coordgen::chat::Message::new("user", "What is the capital of France?")], true).unwrap();
    let prompt = s.tok().encode(&text, true).unwrap();
    let plain = s.generate(&prompt, &GenerateParams { max_tokens: 16, ..Default::default() }, &mut |_| {}).unwrap();
    assert_eq!(reply, plain.text, "JNI chat reply vs the Rust session's");
}
