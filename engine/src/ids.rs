//! Volume identifiers. An ID has one fixed shape, `vol-<32 hex>`, derived from the CSI volume
//! name, so a retried CreateVolume lands on the same ID even after a crash. Only a parsed
//! [`VolumeId`] is ever joined to a path.

use std::fmt;

const PREFIX: &str = "vol-";
/// Namespace for name → ID derivation (a fixed random UUID; changing it orphans every volume).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a0f_3c52_9d1e_4b7a_8e21_5f4c_0b9d_72a3);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(String);

impl VolumeId {
    pub fn for_name(name: &str) -> Self {
        VolumeId(format!(
            "{PREFIX}{}",
            uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).simple()
        ))
    }

    /// `None` for anything that is not exactly `vol-` followed by 32 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix(PREFIX)?;
        (hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| VolumeId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_parse() {
        let a = VolumeId::for_name("pvc-1");
        assert_eq!(a, VolumeId::for_name("pvc-1"));
        assert_ne!(a, VolumeId::for_name("pvc-2"));
        assert_eq!(VolumeId::parse(a.as_str()), Some(a));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "vol-",
            "vol-../../etc/passwd",
            "vol-0123456789abcdef0123456789ABCDEF",
            "vol-0123456789abcdef0123456789abcde",
            "vol-0123456789abcdef0123456789abcdef0",
            "xol-0123456789abcdef0123456789abcdef",
            "vol-0123456789abcdef/123456789abcdef",
            "some-volume-id",
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad:?}");
        }
    }
}
