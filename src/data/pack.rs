//! Sequence packing: several short tokenized examples concatenated into one sequence of at most
//! `seq_len` tokens, so a batch wastes no compute on padding.
//!
//! Packing is only correct if the model cannot look across example boundaries. Each
//! [`PackedSequence`] therefore carries `segment_ids` (attention is allowed only between
//! tokens of the same segment) and `position_ids` that restart at every example. The first
//! token of every segment is never a target, since predicting it would use the previous
//! example as context. An engine that cannot honour `segment_ids` must not use packing.

use serde::Serialize;

use crate::data::TokenizedExample;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PackedSequence {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// Which packed example each token belongs to (0, 1, 2, ... within this sequence).
    pub segment_ids: Vec<u32>,
    /// Position of each token within its own example.
    pub position_ids: Vec<u32>,
    /// Index (into the packed slice) of the example in each segment, in segment order.
    pub source_rows: Vec<usize>,
}

impl PackedSequence {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Whether token `query` may attend to token `key`: causal and within one example.
    pub fn may_attend(&self, query: usize, key: usize) -> bool {
        key <= query && self.segment_ids.get(query) == self.segment_ids.get(key)
    }
}

/// Packs `examples` (each already at most `seq_len` tokens) first-fit-decreasing: longest
/// first, each into the first sequence with room. Deterministic: equal lengths keep their
/// order. Empty examples are skipped.
pub fn pack(examples: &[TokenizedExample], seq_len: usize) -> Result<Vec<PackedSequence>> {
    if seq_len == 0 {
        return Err(Error::config("seq_len", "must be at least 1 token"));
    }
    if let Some((i, ex)) = examples.iter().enumerate().find(|(_, ex)| ex.len() > seq_len) {
        return Err(Error::Data(format!(
            "example {i} has {} tokens, more than seq_len = {seq_len}; truncate before packing",
            ex.len()
        )));
    }
    if let Some(i) = examples.iter().position(|ex| ex.loss_mask.len() != ex.input_ids.len()) {
        return Err(Error::Data(format!(
            "example {i}: loss mask and token ids differ in length"
        )));
    }
    let mut order: Vec<usize> = (0..examples.len()).filter(|&i| !examples[i].is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut bins: Vec<PackedSequence> = vec![];
    for i in order {
        let ex = &examples[i];
        let bin = match bins.iter_mut().position(|b| b.len() + ex.len() <= seq_len) {
            Some(at) => &mut bins[at],
            None => {
                bins.push(PackedSequence::default());
                let last = bins.len() - 1;
                &mut bins[last]
            }
        };
        let segment = bin.source_rows.len() as u32;
        bin.input_ids.extend_from_slice(&ex.input_ids);
        bin.loss_mask.push(false);
        bin.loss_mask.extend_from_slice(&ex.loss_mask[1..]);
        bin.segment_ids.extend(std::iter::repeat_n(segment, ex.len()));
        bin.position_ids.extend(0..ex.len() as u32);
        bin.source_rows.push(i);
    }
    Ok(bins)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, first_id: u32) -> TokenizedExample {
        TokenizedExample {
            input_ids: (first_id..first_id + len as u32).collect(),
            loss_mask: vec![true; len],
            truncated: false,
        }
    }

    #[test]
    fn packs_without_losing_or_mixing_tokens() {
        let examples = vec![ex(6, 0), ex(3, 100), ex(5, 200), ex(2, 300), ex(4, 400), ex(0, 0)];
        let packed = pack(&examples, 8).unwrap();
        // First-fit decreasing: [6,2] [5,3] [4].
        let rows: Vec<Vec<usize>> = packed.iter().map(|p| p.source_rows.clone()).collect();
        assert_eq!(rows, vec![vec![0, 3], vec![2, 1], vec![4]]);
        let total: usize = packed.iter().map(PackedSequence::len).sum();
        assert_eq!(total, 6 + 3 + 5 + 2 + 4);
        let p = &packed[0];
        assert_eq!(p.input_ids, vec![0, 1, 2, 3, 4, 5, 300, 301]);
        assert_eq!(p.segment_ids, vec![0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(p.position_ids, vec![0, 1, 2, 3, 4, 5, 0, 1]);
        // The first token of each segment is not a target.
        assert_eq!(p.loss_mask, vec![false, true, true, true, true, true, false, true]);
        assert!(p.may_attend(5, 0) && !p.may_attend(6, 5) && !p.may_attend(0, 1) && p.may_attend(7, 6));
        assert!(pack(&examples, 5).is_err());
        assert!(pack(&examples, 0).is_err());
    }
}
