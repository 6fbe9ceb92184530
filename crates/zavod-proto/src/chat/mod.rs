//! A chat request's life: prompt assembly, the client's answer stream, the
//! reader of an entry's frames and the entry's machine (placement,
//! redirect, relay, resume, settlement, booking).

pub mod entry;
pub mod failover;
pub mod prompt;
pub mod reader;
