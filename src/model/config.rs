//! The model's `config.json` (HF format) for the XLM-RoBERTa and BERT families.

use std::path::Path;

use serde::Deserialize;

/// Which encoder family a directory holds; decides position ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// XLM-RoBERTa (BGE-M3): position ids start at `pad_token_id + 1`.
    XlmRoberta,
    /// BERT (MiniLM, BGE v1.5): position ids start at 0.
    Bert,
}

/// The fields of `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// `xlm-roberta`, `roberta` or `bert`.
    pub model_type: String,
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// FFN inner size.
    pub intermediate_size: usize,
    /// Rows of the position-embedding table.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table.
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    /// Padding id (XLM-R position ids start after it).
    #[serde(default = "one_u32")]
    pub pad_token_id: u32,
    /// Activation; only exact GELU is supported.
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// Dropout on hidden states (training).
    #[serde(default)]
    pub hidden_dropout_prob: f32,
}

fn one() -> usize {
    1
}
fn one_u32() -> u32 {
    1
}
fn default_eps() -> f32 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        let c: Config = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a model config: {e}", path.display()))?;
        c.family()?;
        if c.hidden_act != "gelu" {
            anyhow::bail!(
                "{}: hidden_act {:?} is not supported (only exact \"gelu\")",
                path.display(),
                c.hidden_act
            );
        }
        let bad = |what: String| anyhow::anyhow!("{}: {what}", path.display());
        for (name, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("type_vocab_size", c.type_vocab_size),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0; it must be at least 1")));
            }
        }
        if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps >= 0.0) {
            return Err(bad(format!(
                "layer_norm_eps {} is not a finite non-negative number",
                c.layer_norm_eps
            )));
        }
        if !(0.0..1.0).contains(&c.hidden_dropout_prob) {
            return Err(bad(format!(
                "hidden_dropout_prob {} is not in [0, 1)",
                c.hidden_dropout_prob
            )));
        }
        if c.family()? == Family::XlmRoberta {
            // Position ids start after pad_token_id (XLM-R), so it must leave room in the
            // position table for at least CLS, one token and EOS.
            let room = (c.max_position_embeddings as u64).checked_sub(c.pad_token_id as u64 + 1);
            if room.is_none_or(|r| r < 3) {
                return Err(bad(format!(
                    "pad_token_id {} leaves fewer than 3 of max_position_embeddings {} for \
                     positions (XLM-R positions start at pad_token_id + 1)",
                    c.pad_token_id, c.max_position_embeddings
                )));
            }
        } else if c.max_position_embeddings < 3 {
            return Err(bad(format!(
                "max_position_embeddings {} is under 3 (CLS, one token, EOS)",
                c.max_position_embeddings
            )));
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            anyhow::bail!(
                "{}: hidden_size {} does not split into {} heads",
                path.display(),
                c.hidden_size,
                c.num_attention_heads
            );
        }
        Ok(c)
    }

    /// The encoder family.
    pub fn family(&self) -> anyhow::Result<Family> {
        match self.model_type.as_str() {
            "xlm-roberta" | "roberta" => Ok(Family::XlmRoberta),
            "bert" => Ok(Family::Bert),
            other => {
                anyhow::bail!("model_type {other:?} is not supported (xlm-roberta, roberta, bert)")
            }
        }
    }

    /// Position id of a sequence's first token.
    pub fn position_offset(&self) -> u32 {
        match self.family() {
            // Validated by `from_file`: pad_token_id + 1 < max_position_embeddings.
            Ok(Family::XlmRoberta) => self.pad_token_id.saturating_add(1),
            _ => 0,
        }
    }

    /// The longest sequence the position table allows, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset() as usize)
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
