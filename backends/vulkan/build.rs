//! Compiles the GLSL compute shaders in `shaders/` to SPIR-V with `glslc` (Debian's `glslc`
//! package; `$GLSLC` overrides the path). One SPIR-V module per (shader, weight type,
//! variant). Without glslc the crate still builds, with no shaders: the plugin then refuses
//! to start with a message saying how to install it, so `cargo build --workspace` works on a
//! machine that never uses Vulkan.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Weight types of the matrix shaders: (name, define).
const TYPES: [&str; 11] = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let src = Path::new("shaders");
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-env-changed=GLSLC");
    let glslc = std::env::var("GLSLC").unwrap_or_else(|_| "glslc".into());
    let have = Command::new(&glslc).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);

    // (module name, source file, defines)
    let mut jobs: Vec<(String, &str, Vec<String>)> = Vec::new();
    for t in TYPES {
        let def = format!("TYPE_{}", t.to_uppercase());
        jobs.push((format!("matmul_{t}"), "matmul.comp", vec![def.clone()]));
        jobs.push((format!("matmul_{t}_sg"), "matmul.comp", vec![def.clone(), "SUBGROUP".into()]));
        jobs.push((format!("matmul_{t}_rows"), "matmul.comp", vec![def.clone(), "ROW_PER_LANE".into()]));
        jobs.push((format!("get_rows_{t}"), "get_rows.comp", vec![def]));
    }
    for s in ["rms_norm", "rope", "kv_write", "attention", "swiglu"] {
        jobs.push((s.to_string(), Box::leak(format!("{s}.comp").into_boxed_str()), vec![]));
    }

    let mut table = String::from("/// SPIR-V modules compiled from `shaders/` by build.rs: (name, words).\npub static MODULES: &[(&str, &[u8])] = &[\n");
    if have {
        for (name, file, defs) in &jobs {
            let spv = out.join(format!("{name}.spv"));
            let mut cmd = Command::new(&glslc);
            cmd.arg("--target-env=vulkan1.1").arg("-O").arg("-fshader-stage=compute");
            for d in defs {
                cmd.arg(format!("-D{d}=1"));
            }
            cmd.arg(src.join(file)).arg("-o").arg(&spv);
            let o = cmd.output().expect("running glslc");
            if !o.status.success() {
                panic!("glslc failed on {file} ({name}):\n{}", String::from_utf8_lossy(&o.stderr));
            }
            table += &format!("    ({name:?}, include_bytes!({:?})),\n", spv.display().to_string());
        }
        println!("cargo:rustc-cfg=shaders_built");
    } else {
        println!("cargo:warning=glslc not found: the Vulkan backend is built without shaders (install Debian's glslc and rebuild)");
    }
    table += "];\n";
    std::fs::write(out.join("shaders.rs"), table).unwrap();
    println!("cargo::rustc-check-cfg=cfg(shaders_built)");
}
