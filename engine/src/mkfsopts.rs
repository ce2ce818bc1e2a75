//! Allowlist for StorageClass `mkfsOptions`: a few tuning flags per filesystem, each with a
//! checked value. Anything that could force, discard or point mkfs elsewhere is refused.

use crate::error::{Error, Result};
use crate::model::FsType;

fn number(v: &str) -> bool {
    !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit())
}

fn size(v: &str) -> bool {
    let digits = v.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G']);
    number(digits) && v.len() - digits.len() <= 1
}

fn label(v: &str) -> bool {
    !v.is_empty() && v.len() <= 16 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn features(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_^,-".contains(&b))
}

type Check = fn(&str) -> bool;

fn key_value(v: &str, allowed: &[(&str, Check)]) -> bool {
    v.split(',')
        .all(|kv| kv.split_once('=').is_some_and(|(k, val)| allowed.iter().any(|(name, ok)| *name == k && ok(val))))
}

fn zero_or_one(v: &str) -> bool {
    v == "0" || v == "1"
}

fn value_ok(fs: FsType, flag: &str, value: &str) -> bool {
    match (fs, flag) {
        (FsType::Ext4, "-b") => matches!(value, "1024" | "2048" | "4096"),
        (FsType::Ext4, "-i" | "-N") => number(value),
        (FsType::Ext4, "-I") => matches!(value, "128" | "256" | "512" | "1024"),
        (FsType::Ext4, "-m") => number(value) && value.parse::<u32>().is_ok_and(|p| p <= 50),
        (FsType::Ext4 | FsType::Btrfs, "-O") => features(value),
        (FsType::Ext4, "-J") => key_value(value, &[("size", number)]),
        (FsType::Xfs, "-b" | "-n") => key_value(value, &[("size", size)]),
        (FsType::Xfs, "-i") => key_value(value, &[("size", size), ("maxpct", number)]),
        (FsType::Xfs, "-m") => {
            key_value(value, &[("reflink", zero_or_one), ("crc", zero_or_one), ("bigtime", zero_or_one)])
        }
        (FsType::Xfs, "-d") => key_value(value, &[("agcount", number), ("su", size), ("sw", number)]),
        (FsType::Btrfs, "-n" | "-s") => size(value),
        (FsType::Btrfs, "--csum") => matches!(value, "crc32c" | "xxhash" | "sha256" | "blake2"),
        (FsType::Btrfs, "-m" | "-d") => matches!(value, "single" | "dup"),
        (_, "-L") => label(value),
        _ => false,
    }
}

/// Validates `mkfsOptions` for `fs`, returning the argument list to pass to mkfs.
pub fn parse(options: &str, fs: FsType) -> Result<Vec<String>> {
    let words: Vec<&str> = options.split_whitespace().collect();
    if !words.len().is_multiple_of(2) {
        return Err(Error::InvalidArgument(format!(
            "mkfsOptions {options:?} must be flag/value pairs such as \"-b 4096\""
        )));
    }
    let mut args = Vec::with_capacity(words.len());
    for pair in words.chunks(2) {
        let (flag, value) = (pair[0], pair[1]);
        if !value_ok(fs, flag, value) {
            return Err(Error::InvalidArgument(format!(
                "mkfsOptions: {flag} {value} is not allowed for {} (allowed: block/inode/node sizes, labels, \
                 features, reflink/crc and similar tuning)",
                fs.as_str()
            )));
        }
        args.push(flag.to_owned());
        args.push(value.to_owned());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tuning_flags() {
        assert_eq!(
            parse("-b 4096 -I 512 -L data_1", FsType::Ext4).unwrap(),
            ["-b", "4096", "-I", "512", "-L", "data_1"]
        );
        assert_eq!(parse("-m reflink=1,crc=1 -i size=512", FsType::Xfs).unwrap().len(), 4);
        assert_eq!(parse("--csum xxhash -n 32k -O no-holes", FsType::Btrfs).unwrap().len(), 6);
        assert!(parse("", FsType::Ext4).unwrap().is_empty());
    }

    #[test]
    fn refuses_everything_dangerous_or_unknown() {
        for (bad, fs) in [
            ("-F x", FsType::Ext4),
            ("-E discard", FsType::Ext4),
            ("-f", FsType::Xfs),
            ("-b", FsType::Ext4),
            ("-b 4096 /dev/sda", FsType::Ext4),
            ("-m reflink=1;rm", FsType::Xfs),
            ("-L $(reboot)", FsType::Btrfs),
            ("-b 4096", FsType::Btrfs),
            ("-K x", FsType::Xfs),
            ("-m 90", FsType::Ext4),
        ] {
            assert!(parse(bad, fs).is_err(), "{bad:?} for {fs:?}");
        }
    }
}
