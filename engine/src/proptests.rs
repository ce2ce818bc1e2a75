//! Property tests of everything that parses input plinth does not control: the mount table
//! (the kernel's, escaped), sizes (typed by people), IDs and pagination tokens (sent by any
//! client), mkfs and mount options (StorageClass authors). Each must never panic, must refuse
//! what it cannot vouch for, and must keep its guarantees for everything it accepts.

use proptest::prelude::*;

use crate::ids::{SnapshotId, VolumeId};
use crate::model::FsType;

fn any_fs() -> impl Strategy<Value = FsType> {
    prop_oneof![Just(FsType::Ext4), Just(FsType::Xfs), Just(FsType::Btrfs)]
}

/// Text that looks like option lists: flags, values, separators, shell and path characters.
fn option_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            "-[a-zA-Z]{1,2}",
            "--[a-z]{1,8}",
            "[a-z_]{1,10}(=[a-z0-9,:/._-]{0,12})?",
            "[0-9]{1,14}[kKmMgG]?",
            Just("/dev/sda".to_owned()),
            Just("-f".to_owned()),
            Just("--force".to_owned()),
            Just("-E".to_owned()),
            Just("discard".to_owned()),
            Just(";".to_owned()),
            Just("$(reboot)".to_owned()),
            ".{0,6}",
        ],
        0..8,
    )
    .prop_map(|words| words.join(" "))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mountinfo_parsing_never_panics(text in ".{0,400}") {
        let _ = crate::sys::mountinfo::parse(&text);
    }

    #[test]
    fn mountinfo_round_trips_escaped_mount_points(name in "[ -~\t\n]{1,30}") {
        // The kernel escapes space, tab, newline and backslash as octal.
        let escaped: String = name.chars().map(|c| match c {
            ' ' => "\\040".to_owned(),
            '\t' => "\\011".to_owned(),
            '\n' => "\\012".to_owned(),
            '\\' => "\\134".to_owned(),
            other => other.to_string(),
        }).collect();
        let line = format!("36 25 7:3 / /mnt/{escaped} rw,relatime shared:1 - ext4 /dev/loop3 rw");
        let entries = crate::sys::mountinfo::parse(&line).expect("a well-formed line parses");
        prop_assert_eq!(entries.len(), 1);
        prop_assert_eq!(entries[0].mount_point.to_string_lossy().into_owned(), format!("/mnt/{name}"));
        prop_assert_eq!(&entries[0].source, "/dev/loop3");
    }

    #[test]
    fn sizes_parse_back_to_what_was_printed(bytes in 0u64..(1u64 << 50), unit in 0usize..5) {
        let (suffix, factor) = [("", 1u64), ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40)][unit];
        let count = bytes / factor;
        prop_assert_eq!(crate::size::parse_size(&format!("{count}{suffix}")), Ok(count * factor));
    }

    #[test]
    fn size_parsing_never_panics_and_never_exceeds_i64(text in ".{0,30}") {
        if let Ok(bytes) = crate::size::parse_size(&text) {
            prop_assert!(bytes <= i64::MAX as u64);
        }
    }

    #[test]
    fn capacity_ranges_are_honoured_or_refused(required in any::<i64>(), limit in any::<i64>(), minimum in 0u64..(1 << 32)) {
        if let Ok(size) = crate::size::resolve_capacity(required, limit, 1 << 30, minimum) {
            prop_assert!(required <= 0 || size >= required as u64);
            prop_assert!(limit <= 0 || size <= limit as u64);
            let ceiling = if limit > 0 { limit as u64 } else { u64::MAX };
            prop_assert!(size >= minimum.min(ceiling), "the filesystem minimum unless the limit is lower");
            prop_assert_eq!(size % (1 << 20), 0, "MiB granularity");
        }
    }

    #[test]
    fn only_the_exact_id_shape_is_accepted(text in ".{0,50}") {
        for parsed in [VolumeId::parse(&text).map(|id| id.as_str().to_owned()), SnapshotId::parse(&text).map(|id| id.as_str().to_owned())].into_iter().flatten() {
            let hex = parsed.split_once('-').map(|(_, h)| h).unwrap_or_default();
            prop_assert_eq!(hex.len(), 32);
            prop_assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            prop_assert!(!parsed.contains('/') && !parsed.contains(".."));
        }
    }

    #[test]
    fn ids_derived_from_any_name_parse_back(name in ".{1,200}") {
        let id = VolumeId::for_name(&name);
        prop_assert_eq!(VolumeId::parse(id.as_str()), Some(id));
    }

    #[test]
    fn accepted_mkfs_options_never_force_discard_or_name_a_device(fs in any_fs(), text in option_text()) {
        if let Ok(args) = crate::mkfsopts::parse(&text, fs) {
            for arg in &args {
                prop_assert!(!matches!(arg.as_str(), "-f" | "-F" | "--force" | "-K" | "-E" | "-q"), "{arg}");
                prop_assert!(!arg.starts_with('/') && !arg.contains("/dev"), "{arg}");
                prop_assert!(!arg.contains(';') && !arg.contains('$') && !arg.contains(' '), "{arg}");
            }
        }
    }

    #[test]
    fn accepted_mount_options_keep_suid_and_devices_off(fs in proptest::option::of(any_fs()), text in option_text()) {
        use crate::sys::mount::MsFlags;
        let flags: Vec<String> = text.split(' ').map(str::to_owned).collect();
        if let Ok(parsed) = crate::mountopts::parse(&flags, fs, &[]) {
            prop_assert!(parsed.flags.contains(MsFlags::MS_NOSUID), "suid needs the operator");
            if fs.is_some() {
                prop_assert!(parsed.flags.contains(MsFlags::MS_NODEV), "devices need the operator");
            }
            prop_assert!(!parsed.flags.intersects(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_MOVE));
            for data in &parsed.data {
                prop_assert!(!data.contains(',') && !data.starts_with("errors=panic"), "{data}");
            }
        }
    }

    #[test]
    fn pagination_tokens_are_ids_or_refused(token in ".{0,40}", max in -3i32..5) {
        let all: Vec<VolumeId> = (0..5).map(|i| VolumeId::for_name(&i.to_string())).collect();
        let mut sorted = all.clone();
        sorted.sort();
        match crate::page::page(sorted, |v| v, &token, max) {
            Ok((page, next)) => {
                prop_assert!(max >= 0);
                prop_assert!(token.is_empty() || VolumeId::parse(&token).is_some());
                prop_assert!(max == 0 || page.len() <= max as usize);
                prop_assert!(next.is_empty() || VolumeId::parse(&next).is_some());
            }
            Err(crate::Error::Aborted(_)) => prop_assert!(VolumeId::parse(&token).is_none() && !token.is_empty()),
            Err(crate::Error::InvalidArgument(_)) => prop_assert!(max < 0),
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}
