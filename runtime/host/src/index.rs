//! `coordgen index`: tokenizes a directory of the user's text files with a model's tokenizer
//! and writes the retrieval drafter's datastore (tokens plus a suffix array).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use coordgen_model::ModelFile;

use crate::tokenizer::Tok;

/// Files larger than this are skipped (they are rarely prose or code).
const MAX_FILE_BYTES: u64 = 4 << 20;

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).with_context(|| format!("cannot read directory {}", dir.display()))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || name == "target" || name == "node_modules" {
            continue;
        }
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect(&p, out)?;
        } else if ft.is_file() && e.metadata()?.len() <= MAX_FILE_BYTES {
            out.push(p);
        }
    }
    Ok(())
}

/// Summary of an indexing run.
pub struct IndexReport {
    pub files: usize,
    pub skipped: usize,
    pub tokens: usize,
}

/// Indexes every UTF-8 text file under `dir` (or the single file `dir`) into `out`.
pub fn build(dir: &Path, model: &Path, out: &Path) -> Result<IndexReport> {
    let file = ModelFile::open(model).with_context(|| format!("cannot load model {}", model.display()))?;
    let tok = Tok::for_model(model, &file)?;
    let mut files = Vec::new();
    if dir.is_file() {
        files.push(dir.to_path_buf());
    } else {
        collect(dir, &mut files)?;
    }
    let mut docs = Vec::new();
    let mut skipped = 0;
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        match String::from_utf8(bytes) {
            Ok(text) if !text.contains('\0') && !text.trim().is_empty() => docs.push(tok.encode(&text, false)?),
            _ => skipped += 1,
        }
    }
    if docs.is_empty() {
        bail!("no text files found under {}", dir.display());
    }
    let model_abs = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    let n = coordgen_drafter_store::datastore::write(out, &model_abs, &docs).map_err(|e| anyhow!(e))?;
    Ok(IndexReport { files: docs.len(), skipped, tokens: n })
}
