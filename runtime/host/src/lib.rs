//! The CoordGen host runtime: plugin configuration and loading, tokenizers and chat
//! templates, sampling, and the generation engine the `coordgen` binary drives.

pub mod batching;
pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod config;
pub mod engine;
pub mod fuzz_targets;
pub mod index;
pub mod open;
pub mod plugins;
pub mod replay;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod spec;
pub mod techniques;
pub mod tokenizer;
pub mod workload;
