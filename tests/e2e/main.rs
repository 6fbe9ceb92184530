//! End-to-end tests: the real `zavod` binary, the real model, real sockets
//! on loopback. One test binary, one module per area.

mod affinity;
mod bad_input;
mod budgets;
mod chat;
mod failover;
mod grants;
mod hostile;
mod http;
mod http_guard;
mod mdns;
mod memory;
mod mesh;
mod models;
mod partition;
mod placement;
mod psk;
mod reattach;
mod recall;
mod relay;
mod revocation;
mod sessions;
mod tailnet;
mod trust;
