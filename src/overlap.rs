//! Finding blocks that share file bytes: two table entries of a hostile
//! image that point at overlapping places would make a write to one guest
//! block change another.

/// Sorts `spans` (`(file offset, length, table index)`) by offset and
/// returns the table indices of up to `max` pairs that overlap, each with
/// the two offsets: `(index, offset, other index, other offset)`.
/// O(n log n) time, no allocation beyond the result.
pub(crate) fn overlaps(spans: &mut [(u64, u64, usize)], max: usize) -> Vec<(usize, u64, usize, u64)> {
    spans.sort_unstable();
    let mut out = Vec::new();
    // The span reaching furthest so far: a later span starting before its
    // end overlaps it.
    let mut reach: Option<(u64, u64, usize)> = None;
    for &(off, len, i) in spans.iter() {
        let end = off.saturating_add(len);
        if let Some((r_off, r_end, r_i)) = reach {
            if off < r_end {
                if out.len() < max {
                    out.push((r_i, r_off, i, off));
                }
                if end <= r_end {
                    continue;
                }
            }
        }
        reach = Some((off, end, i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_overlaps_in_any_order_and_only_them() {
        let mut s = vec![(100, 10, 0), (0, 50, 1), (50, 50, 2), (105, 1, 3), (200, 10, 4)];
        assert_eq!(overlaps(&mut s, 10), vec![(0, 100, 3, 105)]);
        let mut s = vec![(0, 100, 7), (10, 5, 8), (50, 60, 9)];
        assert_eq!(overlaps(&mut s, 10), vec![(7, 0, 8, 10), (7, 0, 9, 50)]);
        let mut s = vec![(0, 10, 0), (0, 10, 1), (0, 10, 2)];
        assert_eq!(overlaps(&mut s, 1).len(), 1);
        let mut s: Vec<(u64, u64, usize)> = (0..1000).map(|i| (i * 4096, 4096, i as usize)).collect();
        assert!(overlaps(&mut s, 10).is_empty());
    }
}
