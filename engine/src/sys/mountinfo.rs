//! Parser for `/proc/self/mountinfo` (proc(5)): the source of truth for "is this mounted?".

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// Path inside the source filesystem that is mounted here ("/" for a whole filesystem).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub mount_options: String,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

impl MountEntry {
    /// Whether this mount's filesystem comes from `device` (by source, since btrfs reports an
    /// anonymous device number rather than the block device's).
    pub fn is_from(&self, device: &Path) -> bool {
        Path::new(&self.source) == device
    }

    pub fn is_read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountInfoError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed mountinfo line {line_number}: {line:?}")]
    Malformed { line_number: usize, line: String },
}

/// Undoes the octal escaping the kernel applies to space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (pre, post) = line.split_once(" - ")?;
    let mut pre_fields = pre.split(' ');
    let mount_id = pre_fields.next()?.parse().ok()?;
    let parent_id = pre_fields.next()?.parse().ok()?;
    let (major, minor) = pre_fields.next()?.split_once(':')?;
    let root = unescape(pre_fields.next()?);
    let mount_point = unescape(pre_fields.next()?);
    let mount_options = pre_fields.next()?.to_owned();
    let mut post_fields = post.split(' ');
    let fs_type = unescape(post_fields.next()?);
    let source = unescape(post_fields.next()?);
    let super_options = post_fields.next().unwrap_or("").to_owned();
    Some(MountEntry {
        mount_id,
        parent_id,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: root.into(),
        mount_point: mount_point.into(),
        mount_options,
        fs_type,
        source,
        super_options,
    })
}

pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountInfoError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            parse_line(line).ok_or_else(|| MountInfoError::Malformed { line_number: index + 1, line: line.to_owned() })
        })
        .collect()
}

/// A snapshot of this process's mount table.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    entries: Vec<MountEntry>,
}

impl MountTable {
    pub fn read() -> Result<Self, MountInfoError> {
        let path = PathBuf::from("/proc/self/mountinfo");
        let text = std::fs::read_to_string(&path).map_err(|source| MountInfoError::Read { path, source })?;
        Ok(Self { entries: parse(&text)? })
    }

    pub fn from_entries(entries: Vec<MountEntry>) -> Self {
        Self { entries }
    }

    /// The mount visible at `path` (the last one stacked there), if any.
    pub fn top_mount_at(&self, path: &Path) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mount_point == path)
    }

    pub fn is_mount_point(&self, path: &Path) -> bool {
        self.top_mount_at(path).is_some()
    }

    /// Every mount whose filesystem was mounted from `device`.
    pub fn mounts_of_device<'a>(&'a self, device: &'a Path) -> impl Iterator<Item = &'a MountEntry> {
        self.entries.iter().filter(move |e| e.is_from(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 0:32 / /tmp rw,nosuid,nodev shared:14 - tmpfs tmpfs rw,size=1024k
120 36 7:3 / /tmp/with\\040space ro,relatime - xfs /dev/loop3 ro,attr2,inode64
121 36 7:3 / /tmp/bind rw,nosuid,nodev,relatime shared:90 master:3 - xfs /dev/loop3 rw
122 36 7:3 /sub /tmp/subdir rw - xfs /dev/loop3 rw
";

    #[test]
    fn parses_fields_and_optional_tags() {
        let entries = parse(SAMPLE).unwrap();
        assert_eq!(entries.len(), 5);
        let bind = &entries[3];
        assert_eq!((bind.major, bind.minor), (7, 3));
        assert_eq!(bind.mount_point, PathBuf::from("/tmp/bind"));
        assert_eq!(bind.fs_type, "xfs");
        assert_eq!(bind.source, "/dev/loop3");
        assert!(!bind.is_read_only());
        assert_eq!(entries[4].root, PathBuf::from("/sub"));
    }

    #[test]
    fn unescapes_octal_sequences() {
        let entries = parse(SAMPLE).unwrap();
        assert_eq!(entries[2].mount_point, PathBuf::from("/tmp/with space"));
        assert!(entries[2].is_read_only());
        assert_eq!(unescape("a\\011b\\134c\\012"), "a\tb\\c\n");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn finds_top_mount_and_device_mounts() {
        let table = MountTable::from_entries(parse(SAMPLE).unwrap());
        assert_eq!(table.top_mount_at(Path::new("/tmp")).unwrap().mount_id, 36);
        assert!(!table.is_mount_point(Path::new("/tmp/nothing")));
        assert_eq!(table.mounts_of_device(Path::new("/dev/loop3")).count(), 3);
        assert_eq!(table.mounts_of_device(Path::new("/dev/loop4")).count(), 0);
        assert!(table.top_mount_at(Path::new("/tmp/bind")).unwrap().is_from(Path::new("/dev/loop3")));
    }

    #[test]
    fn rejects_malformed_lines() {
        let err = parse("22 1 253:0 / / rw\n").unwrap_err();
        assert!(matches!(err, MountInfoError::Malformed { line_number: 1, .. }));
        assert!(parse("x 1 253:0 / / rw - ext4 /dev/vda rw").is_err());
    }
}
