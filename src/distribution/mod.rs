//! Content-addressed piece distribution between nodes, and each node's piece cache (issue 3).
//! An image is cut into pieces named by their SHA-256 (`manifest`); a node fetches the pieces it
//! lacks in parallel from peers that hold them and from the origin, the hive (`swarm`, choices in
//! `plan`, sources in `source`), checks each against its hash before keeping or serving it, keeps
//! it in a two-level LFU cache (`cache`) and serves what it holds to peers (`server`, what it
//! holds and is fetching in `catalog`); each node caps its upload and download (`limiter`).
//!
//! The agent owns one `PieceCache`, one `Catalog`, two `Bandwidth`s; it mounts
//! `server::routes(catalog, cache, up)` on its peer port and runs `Fetcher::fetch` per image.

pub mod cache;
pub mod catalog;
pub mod limiter;
pub mod manifest;
mod output;
mod plan;
pub mod server;
pub mod source;
pub mod swarm;

#[cfg(test)]
mod tests;

pub use cache::{CacheConfig, CacheCounts, CacheStats, Outcome, PieceCache};
pub use catalog::{Catalog, Have};
pub use limiter::Bandwidth;
pub use manifest::{DEFAULT_PIECE_SIZE, Manifest, PieceHash};
pub use source::{HttpSource, PieceSource};
pub use swarm::{FetchConfig, FetchError, FetchReport, Fetcher};
