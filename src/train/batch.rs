//! Turning tokenized examples into padded batches, in a seeded order that a checkpoint can
//! resume exactly (the cursor is an epoch number and a position in that epoch's permutation).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::pack::PackedSequence;
use crate::data::TokenizedExample;
use crate::model::attention::Segments;
use crate::rng::Rng;

/// Where the trainer is in the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: usize,
    pub position: usize,
}

/// A padded batch: `input_ids: [b, t]`, and for the loss the flat row indices (into `b*t`) whose
/// next token is a target, with those target ids.
pub struct Batch {
    pub input_ids: Tensor,
    pub target_rows: Tensor,
    pub targets: Vec<u32>,
    /// Non-padding tokens in the batch.
    pub tokens: usize,
    /// Packed rows ([`make_packed_batch`]): where each row's examples start.
    pub segments: Option<Segments>,
}

/// The permutation of `n` examples used in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::derive(seed.wrapping_add(epoch as u64), "shuffle");
    rng.shuffle(&mut order);
    order
}

/// Takes the next `batch_size` example indices, moving to the next epoch as needed.
pub fn next_indices(cursor: &mut DataCursor, n: usize, batch_size: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch_size);
    let mut order = epoch_order(n, seed, cursor.epoch);
    while out.len() < batch_size {
        if cursor.position >= n {
            cursor.epoch += 1;
            cursor.position = 0;
            order = epoch_order(n, seed, cursor.epoch);
        }
        out.push(order[cursor.position]);
        cursor.position += 1;
    }
    out
}

/// Pads `examples` on the right with `pad_id` to the longest one.
pub fn make_batch(examples: &[&TokenizedExample], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    let t = examples.iter().map(|e| e.len()).max().unwrap_or(0).max(2);
    let b = examples.len();
    let mut ids = vec![pad_id; b * t];
    let mut rows = vec![];
    let mut targets = vec![];
    let mut tokens = 0;
    for (i, e) in examples.iter().enumerate() {
        ids[i * t..i * t + e.len()].copy_from_slice(&e.input_ids);
        tokens += e.len();
        for p in 0..e.len().saturating_sub(1) {
            if e.loss_mask[p + 1] {
                rows.push((i * t + p) as u32);
                targets.push(e.input_ids[p + 1]);
            }
        }
    }
    let n = rows.len();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        target_rows: Tensor::from_vec(rows, n, device)?,
        targets,
        tokens,
        segments: None,
    })
}

/// A batch of packed rows (several examples each, [`crate::data::pack`]), padded on the right
/// to the longest row. Its targets are those [`make_batch`] gives the same examples, in
/// another order: a segment's first token is never a target, so no example predicts from
/// another, and the mean loss over them is the unpacked batch's.
pub fn make_packed_batch(rows: &[&PackedSequence], pad_id: u32, device: &Device) -> crate::error::Result<Batch> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(2);
    let examples: Vec<TokenizedExample> = rows
        .iter()
        .map(|r| TokenizedExample {
            input_ids: r.input_ids.clone(),
            loss_mask: r.loss_mask.clone(),
            truncated: false,
        })
        .collect();
    let refs: Vec<&TokenizedExample> = examples.iter().collect();
    let mut batch = make_batch(&refs, pad_id, device)?;
    let lengths: Vec<Vec<usize>> = rows.iter().map(|r| segment_lengths(&r.segment_ids)).collect();
    batch.segments = Some(Segments::from_lengths(t, &lengths).map_err(crate::error::Error::Data)?);
    Ok(batch)
}

/// Lengths of the runs of equal ids in `segment_ids`.
fn segment_lengths(segment_ids: &[u32]) -> Vec<usize> {
    let mut out: Vec<usize> = vec![];
    for (i, id) in segment_ids.iter().enumerate() {
        if i > 0 && segment_ids[i - 1] == *id {
            if let Some(last) = out.last_mut() {
                *last += 1;
            }
        } else {
            out.push(1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_walks_epochs_deterministically() {
        let mut c = DataCursor::default();
        let a: Vec<usize> = (0..5).flat_map(|_| next_indices(&mut c, 7, 3, 1)).collect();
        assert_eq!(c, DataCursor { epoch: 2, position: 1 });
        let first: std::collections::HashSet<_> = a[..7].iter().collect();
        assert_eq!(first.len(), 7, "each epoch visits every example once");
        let mut c2 = DataCursor { epoch: 1, position: 2 };
        assert_eq!(next_indices(&mut c2, 7, 3, 1), a[9..12].to_vec());
    }

    #[test]
    fn batch_targets_follow_the_mask() {
        let e1 = TokenizedExample {
            input_ids: vec![1, 10, 11, 2],
            loss_mask: vec![false, false, true, true],
            truncated: false,
        };
        let e2 = TokenizedExample {
            input_ids: vec![1, 12],
            loss_mask: vec![false, true],
            truncated: false,
        };
        let b = make_batch(&[&e1, &e2], 0, &Device::Cpu).unwrap();
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 10, 11, 2], vec![1, 12, 0, 0]]
        );
        assert_eq!(b.target_rows.to_vec1::<u32>().unwrap(), vec![1, 2, 4]);
        assert_eq!(b.targets, vec![11, 2, 12]);
        assert_eq!(b.tokens, 6);
    }
}
