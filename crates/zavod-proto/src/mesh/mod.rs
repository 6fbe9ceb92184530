//! The mesh as an entry sees it: capacity reports and when a node sends
//! them (announcer), the membership-gated view they build, breakers,
//! the MCDA score, the placer that picks a target, and quantization tiers
//! (which file of a model family a node loads).

pub mod announcer;
pub mod breaker;
pub mod capacity;
pub mod placer;
pub mod score;
pub mod tiers;
pub mod view;
