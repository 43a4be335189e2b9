//! The JSON the node publishes: caption messages, `…/stats`, Home Assistant discovery.

use std::time::SystemTime;

use serde::Serialize;

use super::capture::Frame;
use super::config::NodeConfig;
use super::mqtt::LinkStats;
use super::spool::SpoolCounts;
use crate::captioner::{Caption, StageMs};
use crate::error::{Error, Result};

/// The model a caption came from.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// `model.id`, or the bundle folder's name.
    pub id: String,
    /// sha256 of the bundle's graphs (hex).
    pub sha256: String,
}

/// Milliseconds, rounded to 0.1 ms as the README's example shows: finer digits are timer noise,
/// and full `f64` digits made the message's size vary by tens of bytes from frame to frame
/// (which a broker's packet limit then sees).
#[derive(Serialize)]
struct Latency {
    #[serde(flatten)]
    stages: StageMs,
    /// From capture to the end of captioning.
    capture_to_caption: f64,
}

impl Latency {
    fn new(stages: &StageMs, capture_to_caption: f64) -> Self {
        let r = |ms: f64| (ms * 10.0).round() / 10.0;
        let StageMs { decode, preprocess, encoder, decoder, total } = *stages;
        let stages = StageMs { decode: r(decode), preprocess: r(preprocess), encoder: r(encoder), decoder: r(decoder), total: r(total) };
        Latency { stages, capture_to_caption: r(capture_to_caption) }
    }
}

/// One caption message on `…/caption` (the README's "MQTT messages").
#[derive(Serialize)]
pub struct CaptionMessage<'a> {
    /// UUIDv7: unique, so subscribers can drop duplicates of an at-least-once delivery.
    pub id: String,
    seq: u64,
    caption: &'a str,
    /// The caption cut to 255 bytes on a character boundary (Home Assistant's state limit).
    state: &'a str,
    language: &'static str,
    /// Capture time, RFC 3339 with milliseconds, UTC.
    timestamp: String,
    source: &'a str,
    latency_ms: Latency,
    model: &'a ModelInfo,
    score: f32,
    tokens: &'a [u32],
}

impl<'a> CaptionMessage<'a> {
    pub fn new(frame: &'a Frame, c: &'a Caption, model: &'a ModelInfo) -> Self {
        CaptionMessage {
            id: uuid::Uuid::now_v7().to_string(),
            seq: frame.seq,
            caption: &c.caption,
            state: cut_utf8(&c.caption, 255),
            language: "fr",
            timestamp: rfc3339_ms(frame.at),
            source: &frame.origin,
            latency_ms: Latency::new(&c.ms, frame.received.elapsed().as_secs_f64() * 1e3),
            model,
            score: c.score,
            tokens: &c.tokens,
        }
    }

    /// The payload. Errors: [`Error::Serialize`].
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::serialize("caption message", e))
    }
}

/// `…/stats`: counters since the daemon started. The first fields are the README's; the rest
/// were added for the reliability work (#16) and only ever appended.
#[derive(Serialize, Default)]
pub struct Stats {
    pub frames: u64,
    pub captions: u64,
    pub bad_frames: u64,
    pub dropped_stale: u64,
    pub unchanged: u64,
    pub paused_skipped: u64,
    /// Captioning failures, model panics included.
    pub caption_errors: u64,
    /// Captions waiting in the spool (on disk and in memory).
    pub spool_depth: usize,
    /// Captions given up by the spool: the oldest when full, unreadable files.
    pub spool_dropped: u64,
    /// Captions set aside for their size (over mqtt.max_payload_bytes or the broker's limit).
    pub oversize_dropped: u64,
    /// Connections lost after CONNACK.
    pub reconnects: u64,
    pub rss_kb: u64,
    pub uptime_s: u64,
    pub paused: bool,
    pub source_error: Option<String>,
    /// CONNACKs received.
    pub connections: u64,
    /// Captions moved to the spool's dead-letter folder (the broker refused them, or too large).
    pub dead_lettered: u64,
    /// Of `spool_depth`, captions held in memory because the disk refuses writes.
    pub spool_memory: usize,
    /// Caption writes the disk refused (each kept in memory instead).
    pub spool_write_errors: u64,
    /// Incoming messages ignored (oversized commands).
    pub incoming_dropped: u64,
    /// Status/stats/discovery messages the broker refused (dropped).
    pub refused_dropped: u64,
    /// Why the last connection ended or the last attempt failed (cut to 160 bytes); null while
    /// none has, and again once a connection has held for 10 s.
    pub link_error: Option<String>,
}

impl Stats {
    /// Fills in the spool's and the link's counters.
    pub fn with(mut self, spool: SpoolCounts, link: Option<&LinkStats>) -> Self {
        self.spool_depth = spool.depth;
        self.spool_memory = spool.memory;
        self.spool_dropped = spool.dropped;
        self.spool_write_errors = spool.write_errors;
        self.dead_lettered = spool.dead_lettered;
        if let Some(l) = link {
            self.connections = l.connections;
            self.reconnects = l.reconnects;
            self.oversize_dropped = l.oversize_dropped;
            self.incoming_dropped = l.incoming_dropped;
            self.refused_dropped = l.refused_dropped;
            // Short: a long cause must not push stats over a broker's packet size limit.
            self.link_error = l.last_error.as_deref().map(|e| cut_utf8(e, 160).to_string());
        }
        self
    }
}

/// Home Assistant MQTT discovery: the topic and body of one sensor whose state is the (cut)
/// caption, with the whole message as attributes, available while the node is online.
pub fn discovery(cfg: &NodeConfig) -> (String, Vec<u8>) {
    let dev = &cfg.mqtt.device_id;
    let uid = format!("vitgpt2_{}_caption", dev.replace(['/', ' '], "_"));
    let body = serde_json::json!({
        "name": "Caption",
        "unique_id": uid,
        "state_topic": cfg.topic("caption"),
        "value_template": "{{ value_json.state }}",
        "json_attributes_topic": cfg.topic("caption"),
        "availability_topic": cfg.topic("status"),
        "payload_available": "online",
        "payload_not_available": "offline",
        "icon": "mdi:image-text",
        "device": {
            "identifiers": [format!("vitgpt2_{dev}")],
            "name": format!("vitgpt2 {dev}"),
            "manufacturer": "vitgpt2",
            "sw_version": env!("CARGO_PKG_VERSION"),
        },
    });
    (format!("{}/sensor/{}/config", cfg.mqtt.discovery_prefix, uid), body.to_string().into_bytes())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn cut_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `2026-11-27T10:00:00.123Z`.
pub fn rfc3339_ms(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // leap day
        assert_eq!(rfc3339_ms(t), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn latencies_to_a_tenth_of_a_millisecond() -> serde_json::Result<()> {
        let ms = StageMs { decode: 0.04, preprocess: 0.4499999, encoder: 231.25000001, decoder: 9.87654321, total: 1234.5678 };
        let v = serde_json::to_value(Latency::new(&ms, 15.05))?;
        let want = serde_json::json!({"decode": 0.0, "preprocess": 0.4, "encoder": 231.3, "decoder": 9.9, "total": 1234.6, "capture_to_caption": 15.1});
        assert_eq!(v, want);
        assert!(v.to_string().contains(r#""encoder":231.3,"#), "printed short: {v}");
        Ok(())
    }

    #[test]
    fn cut_on_char_boundary() {
        let s = "é".repeat(200); // 400 bytes
        let c = cut_utf8(&s, 255);
        assert_eq!(c.len(), 254);
        assert_eq!(cut_utf8("abc", 255), "abc");
    }

    #[test]
    fn stats_keep_the_readme_fields_first() {
        let v = serde_json::to_value(Stats::default()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let readme = [
            "frames", "captions", "bad_frames", "dropped_stale", "unchanged", "paused_skipped", "caption_errors", "spool_depth", "spool_dropped",
            "oversize_dropped", "reconnects", "rss_kb", "uptime_s", "paused", "source_error",
        ];
        for k in readme {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }
}
