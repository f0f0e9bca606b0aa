//! The JSON views the admin API serves and the CLI reads: `/status`,
//! `/peers` and `/why/<hash>`. Plain data, one place for both ends to
//! import them from.

use serde::{Deserialize, Serialize};

/// Made by the peer table itself (`mesh::peers`), which owns its parts.
pub use crate::mesh::peers::PeerView;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Listeners {
    pub quic: Option<String>,
    /// Bulk connections for large NARs (TLS on TCP at the QUIC port,
    /// protocol version 5); absent from older agents' answers.
    #[serde(default)]
    pub bulk: Option<String>,
    pub substituter: Option<String>,
    pub http_cache: Option<String>,
    pub admin: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusView {
    pub name: String,
    pub node_key: String,
    pub fingerprint: String,
    pub mesh_id: String,
    pub version: String,
    pub listeners: Listeners,
    pub store_dir: String,
    pub store_db: String,
    pub store_paths: Option<u64>,
    pub peers_alive: usize,
    pub peers_suspect: usize,
    pub peers_gone: usize,
    pub uptime_s: u64,
}

/// One peer's answer in a `nixmesh why` survey.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SurveyRow {
    pub name: String,
    pub fingerprint: String,
    pub rtt_ms: Option<f64>,
    pub answer_ms: f64,
    pub answer: SurveyAnswer,
    pub would_win: bool,
    /// Whether the peer's summary lists the path (none: it keeps none, or
    /// not one this agent has whole).
    #[serde(default)]
    pub summary: Option<bool>,
}

/// What a peer said when asked for a narinfo, and what became of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", content = "reason", rename_all = "snake_case")]
pub enum SurveyAnswer {
    /// It has the path, and the answer would be offered to Nix.
    Has,
    /// It has the path, but the answer would not be offered (why).
    Rejected(String),
    NotFound,
    /// It did not answer (why).
    Failed(String),
}

impl std::fmt::Display for SurveyAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SurveyAnswer::Has => f.write_str("has it"),
            SurveyAnswer::Rejected(why) => write!(f, "has it, but rejected: {why}"),
            SurveyAnswer::NotFound => f.write_str("does not have it"),
            SurveyAnswer::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}
