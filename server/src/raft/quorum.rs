//! Majority arithmetic over the voters of one configuration.
//!
//! Membership changes are made one voter at a time, so any two consecutive configurations have
//! overlapping majorities and a single majority rule suffices (no joint consensus).

/// The outcome of counting votes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// A majority granted.
    Won,
    /// A majority refused, so no majority can grant any more.
    Lost,
    /// Neither yet.
    Pending,
}

/// How many of `voters` make a majority.
pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// The largest value that at least a majority of `values` (one per voter) reach: the index
/// committed by those match indexes, or the read round confirmed by those acknowledgements.
/// Returns 0 for an empty set.
pub fn majority_value(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[majority(values.len()) - 1]
}

/// Tallies `granted` and `rejected` votes out of `voters`.
pub fn tally(voters: usize, granted: usize, rejected: usize) -> VoteResult {
    let need = majority(voters);
    if granted >= need {
        VoteResult::Won
    } else if rejected > voters - need {
        VoteResult::Lost
    } else {
        VoteResult::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_value_is_the_quorum_th_largest() {
        assert_eq!(majority_value(&mut [5, 3, 9]), 5);
        assert_eq!(majority_value(&mut [5, 3, 9, 1]), 3);
        assert_eq!(majority_value(&mut [7]), 7);
        assert_eq!(majority_value(&mut [1, 2, 3, 4, 5]), 3);
        assert_eq!(majority_value(&mut []), 0);
    }

    #[test]
    fn tally_decides_as_soon_as_the_outcome_is_certain() {
        assert_eq!(tally(3, 2, 0), VoteResult::Won);
        assert_eq!(tally(3, 1, 1), VoteResult::Pending);
        assert_eq!(tally(3, 1, 2), VoteResult::Lost);
        assert_eq!(tally(4, 2, 2), VoteResult::Lost);
        assert_eq!(tally(4, 2, 1), VoteResult::Pending);
        assert_eq!(tally(1, 1, 0), VoteResult::Won);
    }
}
