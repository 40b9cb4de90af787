//! Instruction back-translation (Humpback, Li et al. 2024): the user's own documents are cut into
//! segments (whole paragraphs up to a token budget), the model writes the instruction each
//! segment answers, then rates the pair 1–5 (self-curation); pairs scoring at least the minimum
//! are kept, the segment as the answer.

use std::path::{Path, PathBuf};

use super::prompts::{fill, BACKTRANSLATE_INSTRUCTION, BACKTRANSLATE_RATE};
use super::self_instruct::snippet;
use super::{instruction_problem, too_similar, GenSummary, GeneratedRow, Method, RejectReason, Run, Session};
use crate::error::{Error, Result};

/// Largest document read (bytes): a bigger one is refused rather than held in memory.
pub const MAX_DOCUMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Fewest words a segment needs to stand as an answer.
pub const MIN_SEGMENT_WORDS: usize = 5;

/// One document's text and where it came from (`file` or `file:line` for JSONL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub name: String,
    pub text: String,
}

/// Reads `path`: a .txt/.md file, a .jsonl file whose lines have a `text` field, or a folder of
/// them (recursively, in name order; hidden files skipped). Every file is checked before any
/// generation starts: a binary, empty or too large file, or another extension, is an error
/// naming it.
pub fn read_documents(path: &Path) -> Result<Vec<Document>> {
    let mut files = vec![];
    if path.is_dir() {
        collect(path, &mut files)?;
        if files.is_empty() {
            return Err(Error::invalid(
                path,
                "documents",
                "the folder has no .txt, .md or .jsonl file",
            ));
        }
    } else if path.exists() {
        files.push(path.to_path_buf());
    } else {
        return Err(Error::invalid(path, "documents", "no such file or folder"));
    }
    let mut docs = vec![];
    for file in &files {
        docs.extend(read_document(file)?);
    }
    Ok(docs)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, "cannot list the folder", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn read_document(path: &Path) -> Result<Vec<Document>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if !matches!(ext.as_str(), "txt" | "md" | "jsonl") {
        return Err(Error::invalid(
            path,
            "document",
            "is not a .txt, .md or .jsonl file; convert it to text or move it out of the folder",
        ));
    }
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, "cannot read the document", e))?
        .len();
    if size > MAX_DOCUMENT_BYTES {
        return Err(Error::invalid(
            path,
            "document",
            format!(
                "is {} MiB, over the {} MiB limit; split it into smaller files",
                size / (1024 * 1024),
                MAX_DOCUMENT_BYTES / (1024 * 1024)
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read the document", e))?;
    if bytes.contains(&0) {
        return Err(Error::invalid(
            path,
            "document",
            "is binary (it holds NUL bytes), not text",
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::invalid(
            path,
            "document",
            format!("is not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    if text.trim().is_empty() {
        return Err(Error::invalid(path, "document", "is empty"));
    }
    let name = path.display().to_string();
    if ext != "jsonl" {
        return Ok(vec![Document { name, text }]);
    }
    let mut docs = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::invalid(path, format!("line {}", i + 1), format!("is not JSON ({e})")))?;
        let text = value
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::invalid(path, format!("line {}", i + 1), "has no string field `text`"))?;
        if !text.trim().is_empty() {
            docs.push(Document {
                name: format!("{name}:{}", i + 1),
                text: text.to_string(),
            });
        }
    }
    if docs.is_empty() {
        return Err(Error::invalid(path, "document", "has no line with a non-empty `text`"));
    }
    Ok(docs)
}

/// Paragraphs (split at blank lines) joined into segments of at most `budget` tokens as counted
/// by `count`; a paragraph over the budget is cut between words.
pub fn segments(text: &str, budget: usize, count: &dyn Fn(&str) -> Result<usize>) -> Result<Vec<String>> {
    let mut paragraphs = vec![];
    let mut current = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.trim().is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
            current.clear();
        } else {
            if !current.is_empty() {
                current.push('\n');
            }
            current.push_str(line.trim_end());
        }
    }
    if !current.trim().is_empty() {
        paragraphs.push(current);
    }
    let mut pieces = vec![];
    for p in paragraphs {
        if count(&p)? <= budget {
            pieces.push(p);
            continue;
        }
        // Cut between words: grow a piece word by word (counting again only every few words).
        let mut piece = String::new();
        for word in p.split_whitespace() {
            let candidate = if piece.is_empty() {
                word.to_string()
            } else {
                format!("{piece} {word}")
            };
            if !piece.is_empty() && count(&candidate)? > budget {
                pieces.push(std::mem::replace(&mut piece, word.to_string()));
            } else {
                piece = candidate;
            }
        }
        if !piece.is_empty() {
            pieces.push(piece);
        }
    }
    let mut out: Vec<String> = vec![];
    let mut segment = String::new();
    for piece in pieces {
        let joined = if segment.is_empty() {
            piece.clone()
        } else {
            format!("{segment}\n\n{piece}")
        };
        if !segment.is_empty() && count(&joined)? > budget {
            out.push(std::mem::replace(&mut segment, piece));
        } else {
            segment = joined;
        }
    }
    if !segment.is_empty() {
        out.push(segment);
    }
    Ok(out)
}

/// The 1–5 score in a self-curation reply: the last `Score: N` (markdown and `/5` allowed), else
/// a reply that is just the digit. `None` when no score can be read.
pub fn parse_score(reply: &str) -> Option<u8> {
    let lower = reply.to_lowercase();
    let mut found = None;
    let mut from = 0;
    while let Some(at) = lower[from..].find("score") {
        let start = from + at + "score".len();
        let rest = lower[start..].trim_start_matches([':', '*', ' ', '=']);
        let mut chars = rest.chars();
        if let Some(d) = chars.next().and_then(|c| c.to_digit(10)) {
            let next = chars.next();
            let whole_number = !next.is_some_and(|c| c.is_ascii_digit() || c == '.');
            if whole_number && (1..=5).contains(&d) {
                found = Some(d as u8);
            }
        }
        from = start;
    }
    if found.is_some() {
        return found;
    }
    let t = reply.trim().trim_matches(|c: char| c == '*' || c == '.' || c == ' ');
    let t = t.strip_suffix("/5").unwrap_or(t);
    match t.parse::<u8>() {
        Ok(d) if (1..=5).contains(&d) => Some(d),
        _ => None,
    }
}

/// The instruction in a backward-step reply: the first non-empty line, an `Instruction:` label
/// and quotes removed.
pub fn clean_instruction(reply: &str) -> String {
    let text = reply.trim();
    let text = ["instruction:", "request:", "**instruction:**", "user:"]
        .iter()
        .find_map(|p| {
            text.get(..p.len())
                .filter(|h| h.eq_ignore_ascii_case(p))
                .map(|_| &text[p.len()..])
        })
        .unwrap_or(text);
    text.trim().trim_matches('"').trim().to_string()
}

pub fn run(docs: &[Document], run: &mut Run) -> Result<GenSummary> {
    let mut s = Session::open(run, Method::BackTranslation)?;
    let budget = s.run.settings.segment_tokens;
    let mut work: Vec<(&Document, usize, String)> = vec![];
    for doc in docs {
        let model = &*s.run.model;
        let segs = segments(&doc.text, budget, &|t| model.count_tokens(t))?;
        work.extend(segs.into_iter().enumerate().map(|(i, seg)| (doc, i, seg)));
    }
    let threshold = s.run.settings.rouge_threshold;
    let min_score = s.run.settings.min_score;
    let mut known: Vec<String> = s.existing.iter().map(|r| r.instruction.clone()).collect();
    let first = s.first_attempt();
    for (attempt, (doc, index, segment)) in work.iter().enumerate().skip(first) {
        if s.target_reached() || s.cancelled() {
            break;
        }
        s.attempts += 1;
        if segment.split_whitespace().count() < MIN_SEGMENT_WORDS {
            s.reject(
                RejectReason::ShortSegment,
                format!("{} segment {index}: under {MIN_SEGMENT_WORDS} words", doc.name),
                "",
            );
            s.progress();
            continue;
        }
        let call = s.run.settings.call_seed(attempt, 0);
        let reply = s.ask(&fill(BACKTRANSLATE_INSTRUCTION, &[("text", segment)]), call)?;
        if reply.cancelled {
            break;
        }
        let instruction = clean_instruction(&reply.text);
        let problem = if reply.truncated {
            Some((
                RejectReason::BadInstruction,
                "the instruction hit the token limit".to_string(),
            ))
        } else {
            instruction_problem(&instruction).or_else(|| {
                too_similar(&instruction, &known, threshold).map(|(r, other)| {
                    (
                        RejectReason::Duplicate,
                        format!("ROUGE-L {r:.2} with `{}`", snippet(other)),
                    )
                })
            })
        };
        if let Some((reason, detail)) = problem {
            s.reject(reason, detail, &instruction);
            s.progress();
            continue;
        }
        let rate_seed = s.run.settings.call_seed(attempt, 1);
        let rating = s.ask(
            &fill(
                BACKTRANSLATE_RATE,
                &[("instruction", &instruction), ("answer", segment)],
            ),
            rate_seed,
        )?;
        if rating.cancelled {
            break;
        }
        match parse_score(&rating.text) {
            None => s.reject(
                RejectReason::UnparseableScore,
                format!("no 1-5 score in `{}`", snippet(&rating.text)),
                &instruction,
            ),
            Some(score) if score < min_score => s.reject(
                RejectReason::LowScore,
                format!("score {score} < {min_score}"),
                &instruction,
            ),
            Some(score) => {
                let mut provenance = s.provenance(attempt, call);
                provenance.document = Some(doc.name.clone());
                provenance.segment = Some(*index);
                provenance.score = Some(score);
                known.push(instruction.clone());
                s.keep(GeneratedRow {
                    instruction,
                    input: String::new(),
                    output: segment.clone(),
                    provenance,
                })?;
            }
        }
        s.progress();
    }
    Ok(s.finish(false))
}
