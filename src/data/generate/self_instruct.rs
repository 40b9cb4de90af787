//! Self-Instruct (Wang et al. 2023): each round shows the model a few seed instructions (and
//! instructions it made earlier) as a numbered task list, parses the new tasks it continues
//! the list with, drops unusable ones and near-duplicates (ROUGE-L against every seed and kept
//! instruction at or above the threshold), answers the rest and drops bad answers.

use super::prompts::{fill, SELF_INSTRUCT_ANSWER, SELF_INSTRUCT_TASKS};
use super::{
    answer_problem, instruction_problem, too_similar, GenSummary, GeneratedRow, Method, RejectReason, Run, Session,
    SourceRow,
};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Seed instructions shown per prompt, and earlier generated ones beside them (the paper uses
/// 6 + 2 with 175 seeds; a user's handful of seeds calls for fewer).
const SEEDS_PER_PROMPT: usize = 3;
const GENERATED_PER_PROMPT: usize = 2;

pub fn run(seeds: &[SourceRow], run: &mut Run) -> Result<GenSummary> {
    let seeds: Vec<&SourceRow> = seeds.iter().filter(|s| !s.instruction.trim().is_empty()).collect();
    if seeds.len() < 3 {
        return Err(Error::config(
            "seed-data",
            format!(
                "has {} rows with an instruction; Self-Instruct needs at least 3",
                seeds.len()
            ),
        ));
    }
    let count = run
        .settings
        .count
        .ok_or_else(|| Error::config("count", "Self-Instruct needs a target row count"))?;
    let mut s = Session::open(run, Method::SelfInstruct)?;
    let mut known: Vec<String> = seeds.iter().map(|r| r.instruction.clone()).collect();
    let mut generated: Vec<SourceRow> = s.existing.iter().map(GeneratedRow::source).collect();
    known.extend(generated.iter().map(|r| r.instruction.clone()));
    let limit = s.attempt_limit(count.saturating_sub(s.rows()));
    let threshold = s.run.settings.rouge_threshold;
    let batch = s.run.settings.batch_size;
    let mut attempt = s.first_attempt();
    let mut gave_up = false;
    'rounds: while !s.target_reached() && !s.cancelled() {
        if s.attempts >= limit {
            gave_up = true;
            break;
        }
        s.attempts += 1;
        let mut rng = Rng::new(s.run.settings.call_seed(attempt, 255));
        let mut demos: Vec<SourceRow> = pick(&mut rng, &seeds, SEEDS_PER_PROMPT);
        let earlier: Vec<&SourceRow> = generated.iter().collect();
        demos.extend(pick(&mut rng, &earlier, GENERATED_PER_PROMPT));
        rng.shuffle(&mut demos);
        let prompt = task_prompt(&demos);
        let call = s.run.settings.call_seed(attempt, 0);
        let reply = s.ask(&prompt, call)?;
        if reply.cancelled {
            break;
        }
        let tasks = parse_tasks(&reply.text);
        if tasks.is_empty() {
            s.reject(
                RejectReason::NoInstruction,
                "no task in the reply",
                &snippet(&reply.text),
            );
        }
        for (k, task) in tasks.into_iter().take(batch).enumerate() {
            if s.cancelled() || s.target_reached() {
                break 'rounds;
            }
            if let Some((reason, detail)) = instruction_problem(&task.instruction) {
                s.reject(reason, detail, &task.instruction);
                continue;
            }
            if let Some((r, other)) = too_similar(&task.instruction, &known, threshold) {
                s.reject(
                    RejectReason::Duplicate,
                    format!("ROUGE-L {r:.2} with `{}`", snippet(other)),
                    &task.instruction,
                );
                continue;
            }
            let question = fill(SELF_INSTRUCT_ANSWER, &[("instruction", &task.prompt())]);
            let call = s.run.settings.call_seed(attempt, k + 1);
            let answer = s.ask(&question, call)?;
            if answer.cancelled {
                break 'rounds;
            }
            if let Some((reason, detail)) = answer_problem(&answer, &question) {
                s.reject(reason, detail, &task.instruction);
                continue;
            }
            let mut provenance = s.provenance(attempt, call);
            provenance.seed_rows = demos.iter().map(|d| d.instruction.clone()).collect();
            let row = GeneratedRow {
                instruction: task.instruction.clone(),
                input: task.input.clone(),
                output: answer.text.trim().to_string(),
                provenance,
            };
            known.push(task.instruction.clone());
            generated.push(row.source());
            s.keep(row)?;
        }
        s.progress();
        attempt += 1;
    }
    Ok(s.finish(gave_up))
}

fn pick(rng: &mut Rng, from: &[&SourceRow], n: usize) -> Vec<SourceRow> {
    let mut idx: Vec<usize> = (0..from.len()).collect();
    rng.shuffle(&mut idx);
    idx.into_iter().take(n).map(|i| from[i].clone()).collect()
}

/// The numbered task list of the Self-Instruct prompt.
pub fn task_prompt(demos: &[SourceRow]) -> String {
    let mut tasks = String::new();
    for (i, d) in demos.iter().enumerate() {
        tasks.push_str(&format!("Task {}: {}\n", i + 1, d.instruction.trim()));
        if !d.input.trim().is_empty() {
            tasks.push_str(&format!("Input: {}\n", d.input.trim()));
        }
    }
    let next = (demos.len() + 1).to_string();
    fill(SELF_INSTRUCT_TASKS, &[("tasks", tasks.trim_end()), ("next", &next)])
}

pub(crate) fn snippet(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

/// `rest` after a task label: `Task 4:`, `Task 4.`, `4.`, `4)` (case-insensitive, markdown bold
/// and list markers ignored).
fn strip_task_label(line: &str) -> Option<&str> {
    let l = line.trim_start_matches(['*', '-', '#', ' ', '\t']);
    let (had_word, rest) = match l.get(..4) {
        Some(w) if w.eq_ignore_ascii_case("task") => (true, l[4..].trim_start()),
        _ => (false, l),
    };
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    if !had_word && digits == 0 {
        return None;
    }
    let rest = rest[digits..].trim_start_matches('*');
    let rest = rest.strip_prefix([':', '.', ')'])?;
    Some(rest.trim_start_matches('*').trim())
}

fn strip_field<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    let l = line.trim_start_matches(['*', '-', ' ', '\t']);
    let head = l.get(..name.len())?;
    if !head.eq_ignore_ascii_case(name) {
        return None;
    }
    Some(l[name.len()..].trim_start_matches('*').trim())
}

/// New tasks in a reply: labelled `Task N:` (or `N.`) lines, each with an optional `Input:`;
/// `Output:` parts are ignored. A reply without labels counts as one task (its first line).
pub fn parse_tasks(text: &str) -> Vec<SourceRow> {
    #[derive(PartialEq)]
    enum Part {
        Instruction,
        Input,
        Output,
    }
    let mut tasks: Vec<SourceRow> = vec![];
    let mut current: Option<SourceRow> = None;
    let mut part = Part::Instruction;
    let mut first_unlabelled: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(rest) = strip_task_label(trimmed) {
            tasks.extend(current.take());
            current = Some(SourceRow {
                instruction: rest.to_string(),
                input: String::new(),
                output: String::new(),
            });
            part = Part::Instruction;
            continue;
        }
        if let Some(rest) = strip_field(trimmed, "instruction:") {
            if let Some(c) = current.as_mut().filter(|c| c.instruction.is_empty()) {
                c.instruction = rest.to_string();
                part = Part::Instruction;
                continue;
            }
        }
        if let Some(rest) = strip_field(trimmed, "input:") {
            if let Some(c) = current.as_mut() {
                c.input = rest.to_string();
                part = Part::Input;
                continue;
            }
        }
        if strip_field(trimmed, "output:").is_some() {
            part = Part::Output;
            continue;
        }
        match (current.as_mut(), &part) {
            (Some(c), Part::Instruction) => {
                if !c.instruction.is_empty() {
                    c.instruction.push(' ');
                }
                c.instruction.push_str(trimmed);
            }
            (Some(c), Part::Input) => {
                if !c.input.is_empty() {
                    c.input.push('\n');
                }
                c.input.push_str(trimmed);
            }
            (Some(_), Part::Output) => {}
            (None, _) => {
                first_unlabelled.get_or_insert_with(|| trimmed.to_string());
            }
        }
    }
    tasks.extend(current);
    if tasks.is_empty() {
        if let Some(line) = first_unlabelled {
            tasks.push(SourceRow {
                instruction: line,
                input: String::new(),
                output: String::new(),
            });
        }
    }
    for t in &mut tasks {
        t.instruction = t.instruction.trim().to_string();
        t.input = t.input.trim().to_string();
    }
    tasks.retain(|t| !t.instruction.is_empty());
    tasks
}
