//! Mount option allowlist. Options a CO passes in `mount_flags` become either mount(2) flags or
//! filesystem data options; anything not on the list is refused, so a StorageClass cannot turn
//! on setuid binaries, device nodes or a kernel panic on error (`errors=panic`).

use crate::error::{Error, Result};
use crate::model::FsType;
use crate::sys::mount::MsFlags;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Per-mount-point flags (also applied to bind mounts).
    pub flags: MsFlags,
    /// Filesystem-specific options for the mount(2) data argument.
    pub data: Vec<String>,
}

impl MountOptions {
    pub fn data_string(&self) -> String {
        self.data.join(",")
    }
}

fn flag(name: &str) -> Option<MsFlags> {
    Some(match name {
        "ro" => MsFlags::MS_RDONLY,
        "rw" | "defaults" | "exec" | "async" | "atime" => MsFlags::empty(),
        "noexec" => MsFlags::MS_NOEXEC,
        "nosuid" => MsFlags::MS_NOSUID,
        "nodev" => MsFlags::MS_NODEV,
        "noatime" => MsFlags::MS_NOATIME,
        "nodiratime" => MsFlags::MS_NODIRATIME,
        "relatime" => MsFlags::MS_RELATIME,
        "strictatime" => MsFlags::MS_STRICTATIME,
        "lazytime" => MsFlags::MS_LAZYTIME,
        "sync" => MsFlags::MS_SYNCHRONOUS,
        "dirsync" => MsFlags::MS_DIRSYNC,
        _ => return None,
    })
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit())
}

fn data_option_allowed(option: &str, fs: FsType) -> bool {
    let (key, value) = match option.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (option, None),
    };
    match (fs, key, value) {
        (_, "discard" | "nodiscard", None) => true,
        (FsType::Ext4 | FsType::Btrfs, "commit", Some(v)) => is_number(v),
        (FsType::Ext4, "data", Some(v)) => matches!(v, "ordered" | "journal" | "writeback"),
        (FsType::Ext4, "errors", Some(v)) => matches!(v, "remount-ro" | "continue"),
        (FsType::Ext4, "acl" | "noacl" | "user_xattr" | "nouser_xattr" | "nodelalloc" | "delalloc", None) => true,
        (FsType::Xfs, "nouuid" | "noquota" | "inode64" | "largeio" | "wsync", None) => true,
        (FsType::Xfs, "allocsize", Some(v)) => v.trim_end_matches(['k', 'm', 'g']).bytes().all(|b| b.is_ascii_digit()),
        (FsType::Btrfs, "ssd" | "nossd" | "autodefrag" | "noautodefrag" | "compress" | "compress-force", None) => true,
        (FsType::Btrfs, "discard", Some("async" | "sync")) => true,
        (FsType::Btrfs, "compress" | "compress-force", Some(v)) => {
            let (alg, level) = v.split_once(':').map_or((v, None), |(a, l)| (a, Some(l)));
            matches!(alg, "zstd" | "lzo" | "zlib" | "no") && level.is_none_or(is_number)
        }
        (FsType::Btrfs, "space_cache", Some("v2")) => true,
        _ => false,
    }
}

/// Parses CSI `mount_flags` (each entry may itself be comma-separated). `fs` is `None` for bind
/// mounts of block devices, where only per-mount flags make sense. `operator_allowed` are extra
/// options the operator enabled with `--allow-mount-option` (e.g. `suid`, `dev`).
pub fn parse(mount_flags: &[String], fs: Option<FsType>, operator_allowed: &[String]) -> Result<MountOptions> {
    let mut options = MountOptions { flags: MsFlags::empty(), data: Vec::new() };
    let mut want_suid = false;
    let mut want_dev = false;
    for option in mount_flags.iter().flat_map(|f| f.split(',')).map(str::trim).filter(|o| !o.is_empty()) {
        let operator_ok = operator_allowed.iter().any(|a| a == option);
        if let Some(f) = flag(option) {
            options.flags |= f;
        } else if option == "suid" || option == "dev" {
            if !operator_ok {
                return Err(Error::InvalidArgument(format!(
                    "mount option {option:?} is refused: it lets a volume's files escalate privilege \
                     (an operator can allow it with --allow-mount-option {option})"
                )));
            }
            want_suid |= option == "suid";
            want_dev |= option == "dev";
        } else if fs.is_some_and(|fs| operator_ok || data_option_allowed(option, fs)) {
            if !options.data.iter().any(|d| d == option) {
                options.data.push(option.to_owned());
            }
        } else {
            return Err(Error::InvalidArgument(format!(
                "mount option {option:?} is not allowed{}",
                fs.map(|fs| format!(" for {}", fs.as_str())).unwrap_or_default()
            )));
        }
    }
    if !want_suid {
        options.flags |= MsFlags::MS_NOSUID;
    }
    if !want_dev && fs.is_some() {
        options.flags |= MsFlags::MS_NODEV;
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn splits_flags_from_data_options_and_hardens_by_default() {
        let parsed = parse(&strings(&["noatime,ro", "discard", "commit=30"]), Some(FsType::Ext4), &[]).unwrap();
        assert!(
            parsed.flags.contains(MsFlags::MS_NOATIME | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
        );
        assert_eq!(parsed.data_string(), "discard,commit=30");
        let xfs = parse(&strings(&["nouuid"]), Some(FsType::Xfs), &[]).unwrap();
        assert_eq!(xfs.data, vec!["nouuid".to_owned()]);
        let btrfs = parse(&strings(&["compress=zstd:3"]), Some(FsType::Btrfs), &[]).unwrap();
        assert_eq!(btrfs.data, vec!["compress=zstd:3".to_owned()]);
    }

    #[test]
    fn block_bind_mounts_keep_device_access() {
        let parsed = parse(&[], None, &[]).unwrap();
        assert!(!parsed.flags.contains(MsFlags::MS_NODEV));
        assert!(parse(&strings(&["discard"]), None, &[]).is_err());
    }

    #[test]
    fn refuses_escalation_and_unknown_options() {
        for bad in ["suid", "dev", "errors=panic", "data=bogus", "commit=abc", "nouuid", "x-mount.mkdir", "bind"] {
            let err = parse(&strings(&[bad]), Some(FsType::Ext4), &[]).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}");
        }
        let allowed = parse(&strings(&["suid", "dev"]), Some(FsType::Ext4), &strings(&["suid", "dev"])).unwrap();
        assert!(!allowed.flags.intersects(MsFlags::MS_NOSUID | MsFlags::MS_NODEV));
    }
}
