//! A sandbox's log, as E2B's `GET /sandboxes/{id}/logs` (v1) and
//! `GET /v2/sandboxes/{id}/logs` answer it: what the server did with the
//! sandbox (started, paused, resumed, moved to disk, network changed) and
//! the processes it ran in it (started, ended), the last
//! [`CAPACITY`] entries, kept in memory for the sandbox's life.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::control::rfc3339;

/// Entries kept per sandbox; older ones are dropped.
pub const CAPACITY: usize = 1000;
/// The most entries one answer holds (E2B's limit).
pub const MAX_LIMIT: usize = 1000;

/// E2B's log levels, least severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    fn parse(text: &str) -> Option<Level> {
        Some(match text {
            "debug" => Level::Debug,
            "info" => Level::Info,
            "warn" => Level::Warn,
            "error" => Level::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
struct Entry {
    at: SystemTime,
    level: Level,
    message: String,
    fields: BTreeMap<String, String>,
}

impl Entry {
    fn unix_ms(&self) -> u128 {
        self.at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    }

    fn structured(&self) -> Value {
        json!({
            "timestamp": rfc3339(self.at),
            "level": self.level.name(),
            "message": self.message,
            "fields": self.fields,
        })
    }

    /// The one-line form of the v1 answer's `logs`.
    fn line(&self) -> String {
        let mut line = format!("[{}] {}", self.level.name(), self.message);
        for (k, v) in &self.fields {
            line.push_str(&format!(" {k}={v}"));
        }
        line
    }
}

/// One sandbox's log.
#[derive(Debug, Default)]
pub struct Log(Mutex<VecDeque<Entry>>);

/// What a v2 request asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Query {
    /// Entries from this time on (forward) or up to it (backward), Unix ms.
    pub cursor: Option<u128>,
    pub limit: usize,
    pub backward: bool,
    pub min_level: Option<Level>,
    pub search: Option<String>,
}

/// A query parameter that is not one E2B accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad query parameter {name}={value:?}: {expected}")]
pub struct BadQuery {
    name: &'static str,
    value: String,
    expected: &'static str,
}

impl Query {
    /// The query of a v2 request (`cursor`, `limit`, `direction`,
    /// `level`, `search`), or of a v1 one (`start`, `limit`).
    pub fn parse(query: Option<&str>) -> Result<Query, BadQuery> {
        let param = |name| super::http::query_param(query, name);
        let bad = |name: &'static str, value: String, expected| BadQuery {
            name,
            value,
            expected,
        };
        let number = |name: &'static str| -> Result<Option<u128>, BadQuery> {
            param(name)
                .map(|v| v.parse().map_err(|_| bad(name, v, "a number")))
                .transpose()
        };
        let cursor = number("cursor")?.or(number("start")?);
        let limit = match number("limit")? {
            None => MAX_LIMIT,
            Some(n) if n as usize <= MAX_LIMIT => n as usize,
            Some(n) => return Err(bad("limit", n.to_string(), "at most 1000")),
        };
        let backward = match param("direction").as_deref() {
            None | Some("forward") => false,
            Some("backward") => true,
            Some(other) => {
                return Err(bad("direction", other.into(), "forward or backward"));
            }
        };
        let min_level = param("level")
            .map(|l| Level::parse(&l).ok_or_else(|| bad("level", l, "debug, info, warn or error")))
            .transpose()?;
        let search = param("search");
        if search.as_ref().is_some_and(|s| s.len() > 256) {
            return Err(bad("search", "...".into(), "at most 256 bytes"));
        }
        Ok(Query {
            cursor,
            limit,
            backward,
            min_level,
            search,
        })
    }
}

impl Log {
    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an entry with `fields` (name, value).
    pub fn add(&self, level: Level, message: impl Into<String>, fields: &[(&str, String)]) {
        let entry = Entry {
            at: SystemTime::now(),
            level,
            message: message.into(),
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        };
        let mut entries = self.entries();
        if entries.len() == CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    fn select(&self, q: &Query) -> Vec<Entry> {
        let entries = self.entries();
        let matches = |e: &&Entry| {
            q.min_level.is_none_or(|l| e.level >= l)
                && q.search.as_ref().is_none_or(|s| e.message.contains(s))
                && q.cursor.is_none_or(|c| match q.backward {
                    false => e.unix_ms() >= c,
                    true => e.unix_ms() <= c,
                })
        };
        match q.backward {
            false => entries
                .iter()
                .filter(matches)
                .take(q.limit)
                .cloned()
                .collect(),
            true => entries
                .iter()
                .rev()
                .filter(matches)
                .take(q.limit)
                .cloned()
                .collect(),
        }
    }

    /// The v2 answer: `{"logs": [entry...]}`, newest first when backward.
    pub fn v2(&self, q: &Query) -> Value {
        let logs: Vec<Value> = self.select(q).iter().map(Entry::structured).collect();
        json!({ "logs": logs })
    }

    /// The v1 answer: `{"logs": [{timestamp, line}], "logEntries": [...]}`.
    pub fn v1(&self, q: &Query) -> Value {
        let picked = self.select(&Query {
            backward: false,
            ..q.clone()
        });
        let logs: Vec<Value> = picked
            .iter()
            .map(|e| json!({"timestamp": rfc3339(e.at), "line": e.line()}))
            .collect();
        let entries: Vec<Value> = picked.iter().map(Entry::structured).collect();
        json!({ "logs": logs, "logEntries": entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(v: &Value) -> Vec<String> {
        v["logs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn queries_filter_by_level_text_and_direction() {
        let log = Log::default();
        log.add(
            Level::Info,
            "Sandbox started",
            &[("template", "base".into())],
        );
        log.add(Level::Info, "Process started", &[("pid", "7".into())]);
        log.add(Level::Warn, "Process lost", &[("pid", "7".into())]);
        let all = Query::parse(None).unwrap();
        assert_eq!(
            messages(&log.v2(&all)),
            ["Sandbox started", "Process started", "Process lost"]
        );
        let q = Query::parse(Some("direction=backward&limit=2")).unwrap();
        assert_eq!(messages(&log.v2(&q)), ["Process lost", "Process started"]);
        let q = Query::parse(Some("level=warn")).unwrap();
        assert_eq!(messages(&log.v2(&q)), ["Process lost"]);
        let q = Query::parse(Some("search=Process%20s")).unwrap();
        assert_eq!(messages(&log.v2(&q)), ["Process started"]);
        let future = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 60_000;
        let q = Query::parse(Some(&format!("cursor={future}"))).unwrap();
        assert!(messages(&log.v2(&q)).is_empty());
        let v1 = log.v1(&Query::parse(Some("start=0&limit=1")).unwrap());
        assert_eq!(
            v1["logs"][0]["line"],
            "[info] Sandbox started template=base"
        );
        assert_eq!(v1["logEntries"][0]["fields"]["template"], "base");
        assert_eq!(v1["logs"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn bad_queries_are_refused() {
        for bad in [
            "limit=1001",
            "limit=-1",
            "cursor=soon",
            "direction=up",
            "level=loud",
        ] {
            assert!(Query::parse(Some(bad)).is_err(), "{bad}");
        }
        let long = format!("search={}", "a".repeat(257));
        assert!(Query::parse(Some(&long)).is_err());
    }

    #[test]
    fn the_log_keeps_its_last_entries() {
        let log = Log::default();
        for i in 0..CAPACITY + 5 {
            log.add(Level::Debug, format!("m{i}"), &[]);
        }
        let all = messages(&log.v2(&Query::parse(None).unwrap()));
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0], "m5");
    }
}
