//! Keyset pagination for ListVolumes and ListSnapshots. The token is the last ID of the previous
//! page, so entries deleted or added between pages never make a listing skip or repeat one.

use crate::error::{Error, Result};
use crate::ids::RecordId;

/// One page of `items` (already in ID order) after `starting_token`, at most `max_entries`
/// (0: all). Returns the page and the next token (empty when this is the last page).
pub fn page<T, I: RecordId>(
    items: Vec<T>,
    id: impl Fn(&T) -> &I,
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(Error::InvalidArgument(format!("max_entries must not be negative, got {max_entries}")));
    }
    let after = match starting_token {
        "" => None,
        token => Some(I::parse(token).ok_or_else(|| {
            Error::Aborted(format!("starting_token {token:?} was not issued by this plugin; restart the listing"))
        })?),
    };
    let mut page: Vec<T> = items.into_iter().filter(|item| after.as_ref().is_none_or(|a| id(item) > a)).collect();
    let mut next = String::new();
    if max_entries > 0 && page.len() > max_entries as usize {
        page.truncate(max_entries as usize);
        next = page.last().map(|item| id(item).as_str().to_owned()).unwrap_or_default();
    }
    Ok((page, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SnapshotId, VolumeId};

    fn ids(n: usize) -> Vec<VolumeId> {
        let mut ids: Vec<VolumeId> = (0..n).map(|i| VolumeId::for_name(&format!("v{i}"))).collect();
        ids.sort();
        ids
    }

    #[test]
    fn walks_every_entry_exactly_once() {
        let all = ids(7);
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (chunk, next) = page(all.clone(), |v| v, &token, 3).unwrap();
            seen.extend(chunk);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, all);
        assert_eq!(page(all.clone(), |v| v, "", 0).unwrap(), (all.clone(), String::new()), "0 means everything");
        assert_eq!(page(all.clone(), |v| v, "", 7).unwrap().1, "", "an exact fit has no next page");
    }

    #[test]
    fn survives_the_last_entry_of_a_page_being_deleted() {
        let all = ids(6);
        let (first, token) = page(all.clone(), |v| v, "", 2).unwrap();
        let remaining: Vec<VolumeId> = all.iter().filter(|v| **v != first[1]).cloned().collect();
        let (second, _) = page(remaining, |v| v, &token, 2).unwrap();
        assert_eq!(second, all[2..4].to_vec());
    }

    #[test]
    fn refuses_bad_tokens_and_sizes() {
        for bad in ["-1", "invalid-token", "../../etc", "vol-XYZ"] {
            assert!(matches!(page(ids(3), |v| v, bad, 0), Err(Error::Aborted(_))), "{bad}");
        }
        let snapshot = SnapshotId::for_name("s");
        assert!(matches!(page(ids(3), |v| v, snapshot.as_str(), 0), Err(Error::Aborted(_))), "token of another kind");
        assert!(matches!(page(ids(3), |v| v, "", -1), Err(Error::InvalidArgument(_))));
    }
}
