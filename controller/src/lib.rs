//! CSI Identity and Controller services over the volume engine, plus the RPC boundary helper
//! the node service shares.

pub mod controller;
pub mod group;
pub mod identity;
pub mod metrics;
pub mod rpc;

pub use controller::ControllerService;
pub use group::GroupControllerService;
pub use identity::IdentityService;
