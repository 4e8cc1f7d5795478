//! TEMPORARY interface stand-in (replaced by the tokenize module on merge).
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub pad: u32,
    pub mask: u32,
}

pub trait Tokenizer: Send + Sync {
    fn encode(&self, seq: &str, max_len: Option<usize>) -> Vec<u32>;
    fn token_spans(&self, seq: &str) -> Vec<Option<(usize, usize)>>;
    fn vocab_size(&self) -> usize;
    fn special_tokens(&self) -> SpecialTokens;
    fn id_to_token(&self, id: u32) -> Option<String>;
    fn describe(&self) -> String;
    fn save(&self, dir: &Path) -> anyhow::Result<()>;
}
