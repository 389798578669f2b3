//! The compute pipelines, built once per backend from the SPIR-V that build.rs compiled.
//! The matrix shader comes in three layouts (row per invocation for CPU devices, subgroup
//! per row with `subgroupAdd`, workgroup per row with a shared-memory tree), picked at run
//! time from the device's type and subgroup features, or by the `matmul` option.

use std::collections::HashMap;
use std::sync::Arc;

use coordgen_model::quant::GgmlType;

use crate::gpu::{Ctx, Pipeline};

/// How the matrix shader lays a weight row over a workgroup (see matmul.comp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulVariant {
    /// One invocation per row: CPU devices (lavapipe).
    Row,
    /// One subgroup per row, `subgroupAdd` across its lanes: GPUs with subgroup arithmetic.
    Subgroup,
    /// One workgroup per row and a shared-memory tree: GPUs without it.
    Shared,
}

impl MatmulVariant {
    /// The `matmul` option: "auto" (or none) picks by device, else "row", "subgroup" or
    /// "shared"; "subgroup" on a device without subgroup arithmetic is an error.
    pub fn choose(opt: Option<&str>, ctx: &Ctx) -> Result<MatmulVariant, String> {
        let v = match opt.unwrap_or("auto") {
            "auto" if ctx.info.kind == "CPU" => MatmulVariant::Row,
            "auto" if ctx.info.subgroup_arith => MatmulVariant::Subgroup,
            "auto" | "shared" => MatmulVariant::Shared,
            "row" => MatmulVariant::Row,
            "subgroup" => MatmulVariant::Subgroup,
            o => return Err(format!("vulkan backend options: matmul {o:?} is not one of \"auto\", \"row\", \"subgroup\", \"shared\"")),
        };
        if v == MatmulVariant::Subgroup && !ctx.info.subgroup_arith {
            return Err(format!("vulkan backend options: matmul = \"subgroup\" needs subgroup arithmetic in compute shaders, which {} lacks", ctx.info.name));
        }
        Ok(v)
    }

    pub fn name(self) -> &'static str {
        match self {
            MatmulVariant::Row => "row",
            MatmulVariant::Subgroup => "subgroup",
            MatmulVariant::Shared => "shared",
        }
    }
}

mod built {
    include!(concat!(env!("OUT_DIR"), "/shaders.rs"));
}

pub struct Shaders {
    ctx: Arc<Ctx>,
    matmul: HashMap<GgmlType, Pipeline>,
    get_rows: HashMap<GgmlType, Pipeline>,
    pub rms_norm: Pipeline,
    pub rope: Pipeline,
    pub kv_write: Pipeline,
    pub attention: Pipeline,
    pub swiglu: Pipeline,
    pub variant: MatmulVariant,
    /// Weight rows per workgroup of the matrix shaders (`ROWS` in matmul.comp).
    pub matmul_rows: u32,
}

/// The shader file-name part of a weight type.
pub fn type_key(t: GgmlType) -> &'static str {
    t.name()
}

fn module(name: &str) -> Result<&'static [u8], String> {
    if built::MODULES.is_empty() {
        return Err("vulkan: this plugin was built without its shaders (glslc was missing at build time): install Debian's glslc (scripts/install_vulkan.sh) and rebuild, or use target_backend = \"cpu\"".into());
    }
    built::MODULES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b).ok_or_else(|| format!("vulkan: no shader named {name} in this build"))
}

impl Shaders {
    pub fn new(ctx: &Arc<Ctx>, variant: MatmulVariant) -> Result<Shaders, String> {
        let mk = |name: &str, n: u32, push: u32| Pipeline::new(ctx, name, module(name)?, n, push, &[]);
        // Rows per workgroup: 64 on one invocation each; with one subgroup per row, one per
        // subgroup, so a decode's few hundred rows still spread over every compute unit.
        let sg_size = ctx.info.subgroup_size.clamp(1, 64);
        let matmul_rows = match variant {
            MatmulVariant::Row => 64,
            MatmulVariant::Subgroup => (64 / sg_size).max(1),
            MatmulVariant::Shared => 1,
        };
        let mut matmul = HashMap::new();
        let mut get_rows = HashMap::new();
        for t in GgmlType::ALL {
            let k = type_key(t);
            let mm = match variant {
                MatmulVariant::Row => format!("matmul_{k}_rows"),
                MatmulVariant::Subgroup => format!("matmul_{k}_sg"),
                MatmulVariant::Shared => format!("matmul_{k}"),
            };
            matmul.insert(t, Pipeline::new(ctx, &mm, module(&mm)?, 4, 8 * 4, &[matmul_rows])?);
            get_rows.insert(t, mk(&format!("get_rows_{k}"), 3, 4 * 4)?);
        }
        Ok(Shaders {
            ctx: ctx.clone(),
            matmul,
            get_rows,
            rms_norm: mk("rms_norm", 4, 3 * 4)?,
            rope: mk("rope", 6, 5 * 4)?,
            kv_write: mk("kv_write", 4, 3 * 4)?,
            attention: mk("attention", 6, 9 * 4)?,
            swiglu: mk("swiglu", 2, 4)?,
            variant,
            matmul_rows,
        })
    }

    pub fn matmul(&self, t: GgmlType) -> &Pipeline {
        &self.matmul[&t]
    }

    pub fn get_rows(&self, t: GgmlType) -> &Pipeline {
        &self.get_rows[&t]
    }
}

impl Drop for Shaders {
    fn drop(&mut self) {
        for p in self.matmul.values().chain(self.get_rows.values()) {
            p.destroy(&self.ctx);
        }
        for p in [&self.rms_norm, &self.rope, &self.kv_write, &self.attention, &self.swiglu] {
            p.destroy(&self.ctx);
        }
    }
}
