//! CSI Identity and Controller services over the volume engine, and the CSI plumbing every
//! path shares: the RPC boundary (`rpc`), metrics, the volume context, StorageClass parameters
//! and topology helpers.

pub mod context;
pub mod controller;
pub mod group;
pub mod identity;
pub mod metrics;
pub mod params;
pub mod rpc;
pub mod topology;

pub use controller::ControllerService;
pub use group::GroupControllerService;
pub use identity::IdentityService;
