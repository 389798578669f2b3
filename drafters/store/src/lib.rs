//! File formats shared by the drafter plugins and the host: the retrieval datastore (written
//! by `coordgen index`), the n-gram drafter's persistent cache, and the atomic writes all
//! of CoordGen's files use. A plain library, so the
//! host and tests can use the formats without linking a plugin's exported root module.

pub mod atomic;
pub mod datastore;
pub mod ngram_cache;
