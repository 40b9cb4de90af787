//! The votes format: blind A/B preferences as JSON Lines, one (prompt, chosen, rejected) pair
//! per line, the shape preference-tuning tools (TRL's DPO trainer) read. The studio's Compare
//! mode appends to `<runs folder>/votes.jsonl` through [`append`]; [`read`] loads such a file back.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File (under the runs folder) that blind votes are appended to.
pub const VOTES_FILE: &str = "votes.jsonl";

/// One line of `votes.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteRecord {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_model: String,
    pub rejected_model: String,
    pub system: String,
    /// UTC, RFC 3339.
    pub time: String,
}

/// The records of one vote: the chosen answer against every other answer to the same prompt.
/// `answers` are `(model name, answer text)`; `chosen` indexes them.
pub fn vote_records(
    prompt: &str,
    system: &str,
    answers: &[(&str, &str)],
    chosen: usize,
    time: &str,
) -> Vec<VoteRecord> {
    let Some(&(chosen_model, chosen_text)) = answers.get(chosen) else {
        return vec![];
    };
    answers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != chosen)
        .map(|(_, &(rejected_model, rejected_text))| VoteRecord {
            prompt: prompt.to_string(),
            chosen: chosen_text.to_string(),
            rejected: rejected_text.to_string(),
            chosen_model: chosen_model.to_string(),
            rejected_model: rejected_model.to_string(),
            system: system.to_string(),
            time: time.to_string(),
        })
        .collect()
}

/// Appends `records` to `path` (creating it and its folder, never truncating) and returns how
/// many votes the file holds afterwards.
pub fn append(path: &Path, records: &[VoteRecord]) -> Result<usize> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create the votes folder", e))?;
    }
    let mut text = String::new();
    for r in records {
        let line = serde_json::to_string(r).map_err(|e| Error::invalid(path, "vote", e.to_string()))?;
        text.push_str(&line);
        text.push('\n');
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, "cannot open the votes file", e))?;
    // One write call, so a line is never interleaved with another writer's.
    file.write_all(text.as_bytes())
        .map_err(|e| Error::io(path, "cannot write the votes file", e))?;
    let all = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read the votes file", e))?;
    Ok(all.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Every vote in `path`, in file order. A line that is not a vote is an error naming its line.
pub fn read(path: &Path) -> Result<Vec<VoteRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read the votes file", e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::invalid(path, format!("vote on line {}", i + 1), e.to_string()))
        })
        .collect()
}

/// `2026-11-21T17:37:04Z` for seconds since 1970.
pub fn rfc3339_utc(unix_secs: i64) -> String {
    crate::template::strftime::strftime_utc("%Y-%m-%dT%H:%M:%SZ", unix_secs)
}

/// The current time as [`rfc3339_utc`] writes it.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339_utc(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vote_pairs_the_chosen_answer_with_every_other() {
        let answers = [("base", "b"), ("tuned", "t"), ("other", "o")];
        let records = vote_records("p", "sys", &answers, 1, "T");
        let pairs: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (r.chosen_model.as_str(), r.rejected_model.as_str()))
            .collect();
        assert_eq!(pairs, [("tuned", "base"), ("tuned", "other")]);
        assert!(records
            .iter()
            .all(|r| r.chosen == "t" && r.prompt == "p" && r.system == "sys"));
        assert!(vote_records("p", "", &answers, 3, "T").is_empty());
    }

    #[test]
    fn votes_round_trip_and_appends_never_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(VOTES_FILE);
        let rec = |c: &str| VoteRecord {
            prompt: "p \"quoted\"\nnext line".into(),
            chosen: c.into(),
            rejected: "r".into(),
            chosen_model: "tuned".into(),
            rejected_model: "base".into(),
            system: String::new(),
            time: rfc3339_utc(0),
        };
        assert_eq!(append(&path, &[rec("a")]).unwrap(), 1);
        assert_eq!(append(&path, &[rec("b"), rec("c")]).unwrap(), 3);
        assert_eq!(read(&path).unwrap(), vec![rec("a"), rec("b"), rec("c")]);
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VOTES_FILE);
        std::fs::write(&path, "{\"prompt\": \"p\"}\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("vote on line 1"), "{err}");
        assert!(read(&dir.path().join("absent.jsonl")).is_err());
    }

    #[test]
    fn times_are_rfc3339_utc() {
        // Reference: Python `datetime.fromtimestamp(1795282624, timezone.utc).isoformat()`
        // → 2026-11-21T17:37:04+00:00.
        assert_eq!(rfc3339_utc(1_795_282_624), "2026-11-21T17:37:04Z");
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
