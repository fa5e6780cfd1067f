pub mod actors;
pub mod app;
pub mod config;
pub mod domain;
pub mod drivers;
pub mod http;
pub mod metrics;
pub mod store;
