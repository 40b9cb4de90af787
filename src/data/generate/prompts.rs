//! The prompts Finch's data generators send to the local model, in one place. Each is the
//! paper's template adapted to a chat model: the task goes in one user message, and the
//! answer format is spelled out so that a small model's reply can be parsed.

/// Self-Instruct (Wang et al. 2023, "Self-Instruct: Aligning Language Models with
/// Self-Generated Instructions"), the instruction-generation prompt: "Come up with a series of
/// tasks:" followed by numbered example tasks, the model continuing the list. `{tasks}` is the
/// numbered examples (`Task 1: …`), `{next}` the number of the first new task.
pub const SELF_INSTRUCT_TASKS: &str = "Come up with a series of tasks:\n\n{tasks}\n\
Continue the list with new, diverse tasks a user could ask an AI assistant. Each task is one \
instruction on its own line, starting with `Task {next}:` and numbered on from there. If a task \
needs an input (a text to work on), put it on the next line after `Input:`. Write only the tasks.";

/// Self-Instruct's answer step: the new instruction (and input) is simply asked.
pub const SELF_INSTRUCT_ANSWER: &str = "{instruction}";

/// Self-Instruct's filter of instructions a language model cannot act on (the paper's keyword
/// list: tasks about images, files, audio and the like).
pub const SELF_INSTRUCT_BLOCKED_WORDS: &[&str] = &[
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
];

/// WizardLM (Xu et al. 2023, "WizardLM: Empowering Large Language Models to Follow Complex
/// Instructions"), Evol-Instruct's in-depth evolving prompt. `{method}` is one of
/// [`EVOL_DEPTH_METHODS`], `{instruction}` the prompt being evolved.
pub const EVOL_DEPTH: &str = "I want you act as a Prompt Rewriter.\n\
Your objective is to rewrite a given prompt into a more complex version to make those famous AI \
systems (e.g., chatgpt and GPT4) a bit harder to handle.\n\
But the rewritten prompt must be reasonable and must be understood and responded by humans.\n\
Your rewriting cannot omit the non-text parts such as the table and code in #The Given Prompt#:. \
Also, please do not omit the input in #The Given Prompt#.\n\
You SHOULD complicate the given prompt using the following method:\n{method}\n\
You should try your best not to make the #Rewritten Prompt# become verbose, #Rewritten Prompt# \
can only add 10 to 20 words into #The Given Prompt#.\n\
'#The Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not \
allowed to appear in #Rewritten Prompt#\n\
#The Given Prompt#:\n{instruction}\n\
#Rewritten Prompt#:\n";

/// The four in-depth methods of Evol-Instruct, with the names Finch records in provenance.
pub const EVOL_DEPTH_METHODS: &[(&str, &str)] = &[
    (
        "add-constraints",
        "Please add one more constraints/requirements into #The Given Prompt#.",
    ),
    (
        "deepen",
        "If #The Given Prompt# contains inquiries about certain issues, the depth and breadth of the \
         inquiry can be increased.",
    ),
    (
        "concretize",
        "Please replace general concepts with more specific concepts.",
    ),
    (
        "increase-reasoning",
        "If #The Given Prompt# can be solved with just a few simple thinking processes, you can \
         rewrite it to explicitly request multiple-step reasoning.",
    ),
];

/// Evol-Instruct's in-breadth evolving prompt (a new instruction in the same domain).
pub const EVOL_BREADTH: &str = "I want you act as a Prompt Creator.\n\
Your goal is to draw inspiration from the #Given Prompt# to create a brand new prompt.\n\
This new prompt should belong to the same domain as the #Given Prompt# but be even more rare.\n\
The LENGTH and complexity of the #Created Prompt# should be similar to that of the #Given Prompt#.\n\
The #Created Prompt# must be reasonable and must be understood and responded by humans.\n\
'#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' are not allowed to \
appear in #Created Prompt#\n\
#Given Prompt#:\n{instruction}\n\
#Created Prompt#:\n";

/// Words of the evolving prompts that must not appear in an evolved instruction (WizardLM's
/// fourth elimination rule), compared lowercased.
pub const EVOL_PROMPT_WORDS: &[&str] = &[
    "#the given prompt#",
    "#rewritten prompt#",
    "#given prompt#",
    "#created prompt#",
    "given prompt",
    "rewritten prompt",
    "created prompt",
    "prompt rewriter",
    "prompt creator",
];

/// Humpback (Li et al. 2024, "Self-Alignment with Instruction Backtranslation"), the backward
/// step: the paper fine-tunes a model to predict the instruction from the output; Finch asks the
/// chat model directly. `{text}` is the document segment.
pub const BACKTRANSLATE_INSTRUCTION: &str = "Below is a text written as the answer to a user's \
request to an AI assistant. Write the request (the instruction) this text answers best. Write \
only the instruction, as the user would type it, with no preamble.\n\n\
Text:\n{text}";

/// Humpback's self-curation prompt (the paper's Table 19, the 5-point scale abridged).
pub const BACKTRANSLATE_RATE: &str = "Below is an instruction from an user and a candidate \
answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond \
to the user's instruction. Please assign a score using the following 5-point scale:\n\
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the \
user asked for.\n\
2: It means the answer addresses most of the asks from the user. It does not directly address \
the user's question.\n\
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic \
asks from the user.\n\
4: It means the answer is written from an AI assistant's perspective with a clear focus of \
addressing the instruction. It is complete, clear, and comprehensive.\n\
5: It means it is a perfect answer from an AI Assistant, with expert knowledge, well written, \
logical, easy to follow, engaging and insightful.\n\
Please first provide a brief reasoning you used to derive the rating score, and then write \
\"Score: <rating>\" in the last line.\n\n\
Instruction: {instruction}\n\nAnswer: {answer}";

/// Fills `{name}` placeholders in one pass (a value containing `{…}` is left as it is).
pub fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let var = after
            .find('}')
            .and_then(|end| vars.iter().find(|(n, _)| *n == &after[..end]).map(|(_, v)| (end, v)));
        match var {
            Some((end, value)) => {
                out.push_str(value);
                rest = &after[end + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}
