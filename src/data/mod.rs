//! Instruction data: the example types every part of Finch shares, and (in submodules) loading,
//! validation, chat-template rendering and tokenization with loss masks.

pub mod edit;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod load;
pub mod meta;
pub mod pack;
#[cfg(feature = "parquet")]
pub mod parquet_file;
pub mod quality;
pub mod records;
pub mod split;
pub mod tokenize;
pub mod votes;

use serde::{Deserialize, Serialize};

// Messages are what chat templates render; they live with the templates (data uses
// template, never the other way round) and are re-exported here where the examples use them.
pub use crate::template::{Message, Role, ToolCall};

/// One training example, independent of the file format it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Example {
    /// A conversation rendered with the chat template, with the tool definitions the template
    /// receives as `tools` (JSON text of a list) when the row has them.
    Chat {
        messages: Vec<Message>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tools: Option<String>,
    },
    /// Raw text (continued pre-training style); loss on every token.
    Text { text: String },
    /// A preference pair (DPO / ORPO): one prompt (system and earlier turns included) and two
    /// answers to it, the preferred `chosen` and the `rejected`. Each answer is one or more
    /// messages starting with the assistant; `prompt + chosen` and `prompt + rejected` are whole
    /// conversations ending with the assistant.
    Preference {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tools: Option<String>,
    },
}

impl Example {
    /// A conversation without tool definitions.
    pub fn chat(messages: Vec<Message>) -> Self {
        Example::Chat { messages, tools: None }
    }

    /// The conversation a chat template renders for inspection and supervised training: the
    /// example's own, or for a preference pair the prompt followed by the chosen answer.
    /// `None` for raw text.
    pub fn conversation(&self) -> Option<(Vec<Message>, Option<&str>)> {
        match self {
            Example::Text { .. } => None,
            Example::Chat { messages, tools } => Some((messages.clone(), tools.as_deref())),
            Example::Preference {
                prompt, chosen, tools, ..
            } => Some(([prompt.as_slice(), chosen.as_slice()].concat(), tools.as_deref())),
        }
    }

    pub fn is_preference(&self) -> bool {
        matches!(self, Example::Preference { .. })
    }
}

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossOn {
    /// Assistant turns only, including each turn's end-of-turn token (default).
    #[default]
    Assistant,
    /// Every token ("instruction modelling").
    All,
    /// Only the last assistant turn.
    LastTurn,
}

/// A tokenized example: `loss_mask[i]` says whether token `i` is a training target (predicted
/// from the tokens before it). Both vectors have the same length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// Whether the example was cut to fit `seq_len`.
    pub truncated: bool,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens that carry loss (excluding the first token, which has no context).
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|m| **m).count()
    }
}
