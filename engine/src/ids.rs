//! Identifiers. Each kind has one fixed shape, `<prefix>-<32 hex>`, derived from the CSI name
//! (UUIDv5), so a retried create lands on the same ID even after a crash. Only a parsed ID is ever
//! joined to a path.

use std::fmt;

/// Behaviour shared by every ID kind (used by the generic record store).
pub trait RecordId: Sized + Clone + Ord + fmt::Display {
    fn parse(text: &str) -> Option<Self>;
    fn as_str(&self) -> &str;
}

fn parse_with_prefix(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $namespace:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Namespace for name → ID derivation (fixed; changing it orphans every object).
            const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128($namespace);

            pub fn for_name(name: &str) -> Self {
                $name(format!("{}{}", $prefix, uuid::Uuid::new_v5(&Self::NAMESPACE, name.as_bytes()).simple()))
            }

            /// `None` for anything that is not exactly the prefix followed by 32 lowercase hex digits.
            pub fn parse(text: &str) -> Option<Self> {
                parse_with_prefix(text, $prefix).then(|| $name(text.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl RecordId for $name {
            fn parse(text: &str) -> Option<Self> {
                $name::parse(text)
            }
            fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(deserializer)?;
                $name::parse(&text)
                    .ok_or_else(|| serde::de::Error::custom(format!("malformed {} {text:?}", stringify!($name))))
            }
        }
    };
}

id_type!(
    /// A volume: `vol-<32 hex>`.
    VolumeId, "vol-", 0x6a0f_3c52_9d1e_4b7a_8e21_5f4c_0b9d_72a3
);
id_type!(
    /// A snapshot: `snap-<32 hex>`.
    SnapshotId, "snap-", 0x1b7e_94d0_52c3_4f6e_a0d8_3e61_c7f2_09b5
);
id_type!(
    /// A group snapshot: `group-<32 hex>`.
    GroupSnapshotId, "group-", 0x8c24_e7a1_0f5b_4d93_b6e2_71a8_4c0d_e35f
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_parse() {
        let a = VolumeId::for_name("pvc-1");
        assert_eq!(a, VolumeId::for_name("pvc-1"));
        assert_ne!(a, VolumeId::for_name("pvc-2"));
        assert_eq!(VolumeId::parse(a.as_str()), Some(a.clone()));
        let s = SnapshotId::for_name("pvc-1");
        assert!(s.as_str().starts_with("snap-"));
        assert_eq!(VolumeId::parse(s.as_str()), None, "kinds do not mix");
        assert!(GroupSnapshotId::parse(GroupSnapshotId::for_name("g").as_str()).is_some());
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
