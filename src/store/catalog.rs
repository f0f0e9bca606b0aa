//! Which paths this host shares, as the 32-bit fingerprints peers keep
//! (`HashPart::fingerprint`), and how that set changes as Nix adds and
//! collects paths. Pure: the watcher (`catalog_watch`) feeds it rows of
//! the store DB by id, and it says which fingerprints came and went.
//!
//! Rows are tracked by their DB id, so a collected path is found by the
//! ids that are gone, never by reading paths again; a fingerprint that two
//! shared paths have (rare) stays until both are gone.

use std::collections::{HashMap, HashSet};

/// Fingerprints that appeared in and vanished from the shared set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<u32>,
    pub removed: Vec<u32>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    /// Every valid row seen: its fingerprint when the path is shared.
    rows: HashMap<i64, Option<u32>>,
    /// Shared paths per fingerprint.
    counts: HashMap<u32, u32>,
    max_id: i64,
}

/// What a batch of updates did to each fingerprint it touched: whether
/// it was in the set before.
#[derive(Debug, Default)]
pub struct Touched(HashMap<u32, bool>);

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest row id seen.
    pub fn max_id(&self) -> i64 {
        self.max_id
    }

    /// Valid rows known (shared or not).
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Distinct fingerprints shared.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Every shared fingerprint, sorted.
    pub fn fingerprints(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.counts.keys().copied().collect();
        all.sort_unstable();
        all
    }

    fn touch(&self, touched: &mut Touched, fp: u32) {
        let was = self.counts.contains_key(&fp);
        touched.0.entry(fp).or_insert(was);
    }

    /// New rows: their ids and, for paths the share policy lets out, their
    /// fingerprints. A row already known is left as it is.
    pub fn add_rows(
        &mut self,
        rows: impl IntoIterator<Item = (i64, Option<u32>)>,
        touched: &mut Touched,
    ) {
        for (id, fp) in rows {
            if self.rows.contains_key(&id) {
                continue;
            }
            self.max_id = self.max_id.max(id);
            self.rows.insert(id, fp);
            if let Some(fp) = fp {
                self.touch(touched, fp);
                *self.counts.entry(fp).or_insert(0) += 1;
            }
        }
    }

    /// `valid` holds the ids of every valid row now: the others are gone.
    pub fn keep_rows(&mut self, valid: &[i64], touched: &mut Touched) {
        let valid: HashSet<i64> = valid.iter().copied().collect();
        let gone: Vec<i64> = self
            .rows
            .keys()
            .filter(|id| !valid.contains(id))
            .copied()
            .collect();
        for id in gone {
            let Some(Some(fp)) = self.rows.remove(&id) else {
                continue;
            };
            self.touch(touched, fp);
            if let Some(n) = self.counts.get_mut(&fp) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&fp);
                }
            }
        }
    }

    /// What the updates recorded in `touched` did to the set.
    pub fn change(&self, touched: Touched) -> Change {
        let mut change = Change::default();
        for (fp, was) in touched.0 {
            match (was, self.counts.contains_key(&fp)) {
                (false, true) => change.added.push(fp),
                (true, false) => change.removed.push(fp),
                _ => {}
            }
        }
        change.added.sort_unstable();
        change.removed.sort_unstable();
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_and_collected_paths_make_changes() {
        let mut c = Catalog::new();
        let mut t = Touched::default();
        c.add_rows([(1, Some(10)), (2, None), (3, Some(30))], &mut t);
        assert_eq!(
            c.change(t),
            Change {
                added: vec![10, 30],
                removed: vec![]
            }
        );
        assert_eq!((c.max_id(), c.rows(), c.len()), (3, 3, 2));
        // Collecting 1 and the unshared 2.
        let mut t = Touched::default();
        c.keep_rows(&[3], &mut t);
        assert_eq!(
            c.change(t),
            Change {
                added: vec![],
                removed: vec![10]
            }
        );
        assert_eq!(c.fingerprints(), vec![30]);
        assert_eq!(c.rows(), 1);
    }

    #[test]
    fn a_shared_fingerprint_stays_until_its_last_path_goes() {
        let mut c = Catalog::new();
        let mut t = Touched::default();
        c.add_rows([(1, Some(7)), (2, Some(7))], &mut t);
        assert_eq!(c.change(t).added, vec![7]);
        let mut t = Touched::default();
        c.keep_rows(&[2], &mut t);
        assert!(c.change(t).is_empty(), "path 2 still has it");
        let mut t = Touched::default();
        c.keep_rows(&[], &mut t);
        assert_eq!(c.change(t).removed, vec![7]);
    }

    #[test]
    fn a_path_that_came_and_went_between_looks_changes_nothing() {
        let mut c = Catalog::new();
        let mut t = Touched::default();
        c.add_rows([(5, Some(50))], &mut t);
        c.keep_rows(&[], &mut t);
        assert!(c.change(t).is_empty());
        // A row seen twice counts once.
        let mut t = Touched::default();
        c.add_rows([(6, Some(60)), (6, Some(60))], &mut t);
        c.keep_rows(&[], &mut t);
        assert!(c.change(t).is_empty());
        assert!(c.is_empty());
    }
}
