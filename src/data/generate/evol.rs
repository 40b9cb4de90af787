//! Evol-Instruct (WizardLM, Xu et al. 2023): each attempt takes the next input row, rewrites its
//! instruction in depth (add constraints, deepen, concretize, increase reasoning steps) or in
//! breadth (a new instruction in the same domain), answers it, and applies the paper's
//! elimination rules: no information gain over the original (here: ROUGE-L at or above the
//! threshold), an unusable answer (empty, cut off, repetitive, a short "sorry"), or words of
//! the evolving prompt copied into the instruction.

use super::prompts::{fill, EVOL_BREADTH, EVOL_DEPTH, EVOL_DEPTH_METHODS, EVOL_PROMPT_WORDS};
use super::self_instruct::snippet;
use super::{answer_problem, too_similar, GenSummary, GeneratedRow, Method, RejectReason, Run, Session, SourceRow};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The evolutions, in-depth first, then `breadth`.
pub fn evolutions() -> Vec<&'static str> {
    EVOL_DEPTH_METHODS
        .iter()
        .map(|(name, _)| *name)
        .chain(["breadth"])
        .collect()
}

/// The prompt that evolves `instruction` with `evolution` (a name from [`evolutions`]).
pub fn evol_prompt(evolution: &str, instruction: &str) -> String {
    match EVOL_DEPTH_METHODS.iter().find(|(name, _)| *name == evolution) {
        Some((_, method)) => fill(EVOL_DEPTH, &[("method", method), ("instruction", instruction)]),
        None => fill(EVOL_BREADTH, &[("instruction", instruction)]),
    }
}

pub fn run(rows: &[SourceRow], run: &mut Run) -> Result<GenSummary> {
    let rows: Vec<&SourceRow> = rows.iter().filter(|r| !r.instruction.trim().is_empty()).collect();
    if rows.is_empty() {
        return Err(Error::config("input", "has no rows with an instruction to evolve"));
    }
    let mut s = Session::open(run, Method::EvolInstruct)?;
    let count = s.run.settings.count.unwrap_or(rows.len());
    s.target = Some(count);
    let threshold = s.run.settings.rouge_threshold;
    let mut known: Vec<String> = s.existing.iter().map(|r| r.instruction.clone()).collect();
    let limit = s.attempt_limit(count.saturating_sub(s.rows()));
    let kinds = evolutions();
    let mut attempt = s.first_attempt();
    let mut gave_up = false;
    while !s.target_reached() && !s.cancelled() {
        if s.attempts >= limit {
            gave_up = true;
            break;
        }
        s.attempts += 1;
        let original = rows[attempt % rows.len()];
        let evolution = kinds[Rng::new(s.run.settings.call_seed(attempt, 255)).below(kinds.len())];
        let call = s.run.settings.call_seed(attempt, 0);
        let reply = s.ask(&evol_prompt(evolution, &original.prompt()), call)?;
        if reply.cancelled {
            break;
        }
        let evolved = reply.text.trim().trim_matches('"').trim().to_string();
        if let Some(reason) = evolved_problem(&evolved, reply.truncated, original, &known, threshold) {
            s.reject(reason.0, reason.1, &evolved);
        } else {
            let call = s.run.settings.call_seed(attempt, 1);
            let answer = s.ask(&evolved, call)?;
            if answer.cancelled {
                break;
            }
            if let Some((reason, detail)) = answer_problem(&answer, &evolved) {
                s.reject(reason, detail, &evolved);
            } else {
                let mut provenance = s.provenance(attempt, call);
                provenance.original = Some(original.clone());
                provenance.evolution = Some(evolution.to_string());
                provenance.seed_rows = vec![original.instruction.clone()];
                known.push(evolved.clone());
                s.keep(GeneratedRow {
                    instruction: evolved,
                    input: String::new(),
                    output: answer.text.trim().to_string(),
                    provenance,
                })?;
            }
        }
        s.progress();
        attempt += 1;
    }
    Ok(s.finish(gave_up))
}

/// WizardLM's elimination rules on the evolved instruction (the answer's come after).
pub fn evolved_problem(
    evolved: &str,
    truncated: bool,
    original: &SourceRow,
    known: &[String],
    threshold: f64,
) -> Option<(RejectReason, String)> {
    if !evolved.chars().any(char::is_alphanumeric) {
        return Some((RejectReason::NoInstruction, "empty rewrite".into()));
    }
    if truncated {
        return Some((RejectReason::BadInstruction, "the rewrite hit the token limit".into()));
    }
    let lower = evolved.to_lowercase();
    if let Some(word) = EVOL_PROMPT_WORDS.iter().find(|w| lower.contains(*w)) {
        return Some((RejectReason::PromptCopied, format!("contains `{word}`")));
    }
    let gain = super::rouge_l(evolved, &original.prompt());
    if gain >= threshold {
        return Some((
            RejectReason::NoGain,
            format!(
                "ROUGE-L {gain:.2} with the original `{}`",
                snippet(&original.instruction)
            ),
        ));
    }
    if let Some((r, other)) = too_similar(evolved, known, threshold) {
        return Some((
            RejectReason::Duplicate,
            format!("ROUGE-L {r:.2} with `{}`", snippet(other)),
        ));
    }
    None
}
