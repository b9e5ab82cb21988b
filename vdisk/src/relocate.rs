//! Planning block moves for offline compaction (`Image::relocate`): the
//! blocks at the end of the file move into the lowest free places, a round
//! at a time. A round only targets space that no block or structure uses
//! *before* the round, so a move never overwrites the source of another
//! move whose table entry is not durable yet; the format copies a round's
//! blocks, makes them durable, switches their entries (durably), and only
//! then do the old places count as free for the next round.

/// One move: block `id` from file offset `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Move {
    pub id: u64,
    pub from: u64,
    pub to: u64,
}

/// The next round: up to `max` of the highest blocks (`(id, offset)`, each
/// `span` bytes) into the lowest free places below them. `used` holds every
/// extent in use, blocks included (`start, end`); `place(pos)` is where a
/// block may start at or after `pos` (alignment).
pub(crate) fn round(
    blocks: &[(u64, u64)],
    used: &[(u64, u64)],
    span: u64,
    place: impl Fn(u64) -> Option<u64>,
    max: usize,
) -> Vec<Move> {
    let mut by_end: Vec<(u64, u64)> = blocks.to_vec();
    by_end.sort_unstable_by_key(|b| std::cmp::Reverse(b.1));
    let Some(&(_, highest)) = by_end.first() else {
        return Vec::new();
    };
    let mut extents = used.to_vec();
    extents.sort_unstable();
    extents.push((highest, u64::MAX));
    let mut holes = Vec::new();
    let mut pos = 0u64;
    'outer: for &(s, e) in &extents {
        while let Some(at) = place(pos) {
            if at.checked_add(span).is_none_or(|end| end > s) {
                break;
            }
            holes.push(at);
            if holes.len() >= max {
                break 'outer;
            }
            pos = at + span;
        }
        pos = pos.max(e);
    }
    let mut moves = Vec::new();
    for (&(id, from), &to) in by_end.iter().zip(&holes) {
        if to + span > from {
            break;
        }
        moves.push(Move { id, from, to });
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_blocks_fill_lowest_holes() {
        // Structures 0..10, blocks of 10 at 20, 40, 50, 70: holes at 10, 30, 60.
        let blocks = [(0, 20), (1, 40), (2, 50), (3, 70)];
        let mut used = vec![(0, 10)];
        used.extend(blocks.iter().map(|&(_, o)| (o, o + 10)));
        let m = round(&blocks, &used, 10, Some, 16);
        assert_eq!(
            m,
            [
                Move {
                    id: 3,
                    from: 70,
                    to: 10
                },
                Move {
                    id: 2,
                    from: 50,
                    to: 30
                },
            ]
        );
        // Aligned places: only 40-aligned starts.
        let m = round(
            &blocks,
            &used,
            10,
            |p: u64| p.checked_next_multiple_of(40),
            16,
        );
        assert_eq!(m, []);
        assert_eq!(round(&[], &used, 10, Some, 16), []);
    }
}
