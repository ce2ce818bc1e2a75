//! Error counters a mounted filesystem keeps in sysfs.

use crate::sys::loopdev::LoopDevice;

/// ext4's `errors_count` for the filesystem on `device` (`None` when not mounted or unknown).
pub fn ext4_error_count(device: LoopDevice) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/fs/ext4/loop{}/errors_count", device.number))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}
