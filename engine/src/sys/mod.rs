//! Narrow wrappers around each family of system interfaces plinth uses. Everything above this
//! module reads as intent ("attach", "mount", "probe"); everything below is syscalls and tools.

pub mod copy;
pub mod freeze;
pub mod fserrors;
pub mod loopdev;
pub mod mkfs;
pub mod mount;
pub mod mountinfo;
pub mod statfs;
