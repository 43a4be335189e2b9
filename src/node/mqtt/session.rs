//! The MQTT link's state machine, without sockets, threads or clocks of its own: it is fed
//! the connection's events ([`Event`]) and the time, and acts through a [`Wire`]. So every
//! rule below is unit-tested without a broker (`tests.rs`).
//!
//! - A caption leaves the spool only on its PUBACK (PUBCOMP for QoS 2; for QoS 0, once
//!   written); after a reconnect the spool is replayed from its oldest caption, at most
//!   `window` unacknowledged at a time. Subscriptions are renewed on every CONNACK.
//! - Reconnects wait an exponential backoff with jitter. The backoff and the "careful" mode
//!   below end only once a connection has held for [`STABLE`]: a broker that accepts the
//!   connection and drops it soon after must not be hammered.
//! - Careful mode: after the broker hung up while publishes were unacknowledged, one publish
//!   at a time is in flight, so that a message the broker refuses (e.g. over its maximum
//!   packet size: mosquitto just closes the connection) is singled out. One after which the
//!   broker hung up `dead_letter_after` times in a row is refused: a caption goes to the
//!   spool's dead-letter folder, anything else is dropped, and messages at least that large
//!   are refused from then on (the broker's limit, learned). With MQTT 5 the broker states
//!   its limit in CONNACK and larger messages are refused before they are sent.
//! - Incoming messages over the size a command can have are dropped with one warning; a
//!   broker that keeps sending a message over `mqtt.max_incoming_bytes` (which ends the
//!   connection) gets the command topic unsubscribed for the rest of the run.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rumqttc::QoS;

use super::cause::{Cause, CauseKind, Endpoint};
use crate::node::backoff::Backoff;
use crate::node::spool::Spool;

/// A connection that held this long resets the backoff and ends careful mode.
pub const STABLE: Duration = Duration::from_secs(10);
/// A publish written this long before the broker hung up is a suspect.
const SUSPECT: Duration = Duration::from_secs(5);
/// Non-caption messages (status, stats, discovery) in flight at once.
const OTHERS_WINDOW: usize = 4;
/// Commands are short words; longer payloads on the command topic are ignored.
pub const MAX_COMMAND_BYTES: usize = 64;
/// Losses to an oversized incoming packet before the command topic is given up.
const INCOMING_STRIKES: u32 = 2;
/// Failed connection attempts in a row are logged at the first and every this many.
const LOG_EVERY: u32 = 10;

/// The client side of one connection, as the session uses it.
pub trait Wire {
    /// Hands a PUBLISH to the client; false when its request queue is full.
    fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool;
    fn subscribe(&mut self, topic: &str, qos: QoS) -> bool;
    fn unsubscribe(&mut self, topic: &str) -> bool;
}

/// What a connection reports, whatever the protocol version.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// CONNACK (accepted); `max_packet`: the broker's Maximum Packet Size (MQTT 5), in bytes.
    ConnAck { max_packet: Option<usize> },
    /// A PUBLISH was written to the socket with this packet identifier (0 for QoS 0).
    Written(u16),
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) for this packet identifier.
    Acked(u16),
    /// MQTT 5: the broker answered with a failure reason code (not authorized, quota
    /// exceeded, topic invalid…): it will never take this message.
    Refused { pkid: u16, reason: String },
    /// A PUBLISH from the broker.
    Message { topic: String, payload: Vec<u8> },
    /// Any other packet from the broker.
    Other,
    /// The connection ended.
    Lost(Cause),
}

/// What the link passes up to the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A message on `…/cmd`.
    Command(String),
    /// Home Assistant came (back) online: discovery must be republished.
    HomeAssistantOnline,
}

/// The session's fixed settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoint: Endpoint,
    pub caption_topic: String,
    pub cmd_topic: String,
    pub ha_status_topic: Option<String>,
    /// QoS of caption messages.
    pub qos: QoS,
    /// Captions unacknowledged at once.
    pub window: usize,
    /// Captions larger than this (payload bytes) are set aside.
    pub max_payload: usize,
    pub dead_letter_after: u32,
    /// MQTT 5 (packet sizes count the property length).
    pub v5: bool,
}

/// The link's counters, for `…/stats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkStats {
    /// CONNACKs received.
    pub connections: u64,
    /// Connections lost after CONNACK.
    pub reconnects: u64,
    /// Captions set aside for their size (over mqtt.max_payload_bytes or the broker's limit).
    pub oversize_dropped: u64,
    /// Non-caption messages the broker refused (dropped).
    pub refused_dropped: u64,
    /// Incoming messages ignored (commands over [`MAX_COMMAND_BYTES`]).
    pub incoming_dropped: u64,
    /// Why the last connection ended or the last attempt failed; `None` while none has, and
    /// again once a connection has held for [`STABLE`].
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting until this time to connect again.
    Down { retry_at: Instant },
    Connecting,
    Up { since: Instant },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Caption(u64),
    Topic(String),
}

#[derive(Debug, Clone)]
struct Sent {
    subject: Subject,
    offline: bool,
    /// Packet size in bytes.
    size: usize,
    at: Instant,
}

struct Queued {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
    offline: bool,
}

/// The link's state: connection, what is in flight, backoff, strikes, counters.
pub struct Session {
    s: Settings,
    backoff: Backoff,
    state: State,
    /// Failed attempts and short-lived connections since the link last held.
    failures: u32,
    last_logged: Option<String>,
    /// Handed to the client, not yet written (rumqttc reports writes in request order).
    requested: VecDeque<Sent>,
    /// Written, waiting for PUBACK, by packet identifier.
    inflight: HashMap<u16, Sent>,
    /// Highest spool id handed to the client on this connection.
    cursor: u64,
    /// Non-caption messages waiting for room (the newest per topic).
    outbox: VecDeque<Queued>,
    careful: bool,
    strikes: HashMap<Subject, u32>,
    /// Packets of this size or more are refused (learned, or the broker's MQTT 5 limit + 1).
    limit: Option<usize>,
    /// Maximum Packet Size from this connection's CONNACK.
    broker_max: Option<usize>,
    /// Largest packet the broker ever acknowledged, in bytes.
    max_acked: usize,
    subscribe_cmd: bool,
    incoming_strikes: u32,
    big_command_logged: bool,
    offline_acked: bool,
    stats: LinkStats,
}

/// Size of a PUBLISH packet in bytes (MQTT 3.1.1; MQTT 5 adds the property length, counted).
pub fn packet_size(topic: &str, payload: usize, qos: QoS, v5: bool) -> usize {
    let rest = 2 + topic.len() + if qos == QoS::AtMostOnce { 0 } else { 2 } + payload + usize::from(v5);
    let len_bytes = match rest {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_bytes + rest
}

impl Session {
    pub fn new(s: Settings, backoff: Backoff, now: Instant) -> Self {
        Session {
            s,
            backoff,
            state: State::Down { retry_at: now },
            failures: 0,
            last_logged: None,
            requested: VecDeque::new(),
            inflight: HashMap::new(),
            cursor: 0,
            outbox: VecDeque::new(),
            careful: false,
            strikes: HashMap::new(),
            limit: None,
            broker_max: None,
            max_acked: 0,
            subscribe_cmd: true,
            incoming_strikes: 0,
            big_command_logged: false,
            offline_acked: false,
            stats: LinkStats::default(),
        }
    }

    pub fn connected(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Whether a connection attempt is due now.
    pub fn due(&self, now: Instant) -> bool {
        matches!(self.state, State::Down { retry_at } if now >= retry_at)
    }

    /// How long until an attempt is due (`None` while connecting or connected).
    pub fn until_due(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Down { retry_at } => Some(retry_at.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// A connection attempt has started.
    pub fn connecting(&mut self) {
        self.state = State::Connecting;
    }

    /// Whether the link is in careful mode (one publish in flight at a time).
    pub fn careful(&self) -> bool {
        self.careful
    }

    /// Captions handed to the client and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.requested.iter().chain(self.inflight.values()).filter(|t| matches!(t.subject, Subject::Caption(_))).count()
    }

    pub fn offline_acked(&self) -> bool {
        self.offline_acked
    }

    pub fn stats(&self) -> LinkStats {
        self.stats.clone()
    }

    /// Queues a non-caption message (status, stats, discovery), sent at QoS 1 so that the
    /// broker's PUBACK shows it was taken. Not spooled: these are state, and the next one
    /// replaces them; one queued for the same topic is replaced.
    pub fn queue(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.queue_tagged(topic, retain, payload, false);
    }

    /// The retained `offline` sent at shutdown; [`Self::offline_acked`] turns true on its PUBACK.
    pub fn queue_offline(&mut self, topic: &str) {
        self.offline_acked = false;
        self.queue_tagged(topic, true, b"offline".to_vec(), true);
    }

    fn queue_tagged(&mut self, topic: &str, retain: bool, payload: Vec<u8>, offline: bool) {
        if !self.connected() {
            return;
        }
        self.outbox.retain(|q| q.topic != topic);
        self.outbox.push_back(Queued { topic: topic.to_string(), retain, payload, offline });
    }

    /// Sends what fits: queued messages first, then spooled captions, oldest first.
    pub fn pump(&mut self, now: Instant, spool: &mut Spool, wire: &mut dyn Wire) {
        let State::Up { since } = self.state else { return };
        if now.duration_since(since) >= STABLE {
            self.held();
        }
        loop {
            if self.careful && !(self.requested.is_empty() && self.inflight.is_empty()) {
                return;
            }
            let others = self.requested.iter().chain(self.inflight.values()).filter(|t| matches!(t.subject, Subject::Topic(_))).count();
            if others < OTHERS_WINDOW {
                if let Some(q) = self.outbox.pop_front() {
                    if !self.send_other(now, q, wire) {
                        return;
                    }
                    continue;
                }
            }
            if self.unacked() >= self.s.window {
                return;
            }
            let Some(id) = spool.next_after(self.cursor) else { return };
            let payload = match spool.read(id) {
                Ok(p) => p,
                Err(e) => {
                    spool.discard(id, &e);
                    continue;
                }
            };
            let size = packet_size(&self.s.caption_topic, payload.len(), self.s.qos, self.s.v5);
            if let Some(why) = self.too_big(payload.len(), size) {
                self.stats.oversize_dropped += 1;
                self.set_aside(spool, id, size, &why);
                continue;
            }
            if !wire.publish(&self.s.caption_topic, self.s.qos, false, payload) {
                return; // request queue full: on the next event
            }
            self.requested.push_back(Sent { subject: Subject::Caption(id), offline: false, size, at: now });
            self.cursor = id;
        }
    }

    /// Why a caption of `payload` bytes (a packet of `size`) is not sent, if it is not.
    fn too_big(&self, payload: usize, size: usize) -> Option<String> {
        if payload > self.s.max_payload {
            return Some(format!("over mqtt.max_payload_bytes ({})", self.s.max_payload));
        }
        match (self.broker_max, self.limit) {
            (Some(m), _) if size > m => Some(format!("over the broker's maximum packet size ({m} bytes, from its CONNACK)")),
            (_, Some(l)) if size >= l => Some(format!("at least the size of a message the broker refused ({l} bytes)")),
            _ => None,
        }
    }

    /// Whether a non-caption message of `payload` bytes on `topic` is under the broker's
    /// packet size limit, as far as it is known.
    pub fn fits(&self, topic: &str, payload: usize) -> bool {
        let size = packet_size(topic, payload, QoS::AtLeastOnce, self.s.v5);
        !(self.broker_max.is_some_and(|m| size > m) || self.limit.is_some_and(|l| size >= l))
    }

    fn send_other(&mut self, now: Instant, q: Queued, wire: &mut dyn Wire) -> bool {
        let size = packet_size(&q.topic, q.payload.len(), QoS::AtLeastOnce, self.s.v5);
        if !self.fits(&q.topic, q.payload.len()) {
            self.stats.refused_dropped += 1;
            tracing::warn!(topic = %q.topic, bytes = size, "mqtt: message not sent: over the broker's packet size limit");
            return true;
        }
        if !wire.publish(&q.topic, QoS::AtLeastOnce, q.retain, q.payload.clone()) {
            self.outbox.push_front(q);
            return false;
        }
        self.requested.push_back(Sent { subject: Subject::Topic(q.topic), offline: q.offline, size, at: now });
        true
    }

    /// Handles one event from the connection; returns what the daemon must act on.
    pub fn handle(&mut self, ev: Event, now: Instant, spool: &mut Spool, wire: &mut dyn Wire) -> Option<Inbound> {
        match ev {
            Event::ConnAck { max_packet } => {
                self.state = State::Up { since: now };
                self.stats.connections += 1;
                self.requested.clear();
                self.inflight.clear();
                self.outbox.clear();
                self.cursor = 0;
                self.broker_max = max_packet;
                self.last_logged = None;
                tracing::info!(broker = %self.s.endpoint, spool = spool.len(), careful = self.careful, "mqtt: connected");
                // rumqttc forgets subscriptions on reconnect: subscribe on every CONNACK.
                if self.subscribe_cmd {
                    wire.subscribe(&self.s.cmd_topic, QoS::AtLeastOnce);
                }
                if let Some(t) = &self.s.ha_status_topic {
                    wire.subscribe(t, QoS::AtLeastOnce);
                }
                None
            }
            Event::Written(pkid) => {
                let sent = self.requested.pop_front()?;
                match sent.subject {
                    // QoS 0 has no acknowledgement: written to the socket is all it gets.
                    Subject::Caption(id) if self.s.qos == QoS::AtMostOnce => spool.remove(id),
                    _ if pkid == 0 => {}
                    _ => {
                        self.inflight.insert(pkid, sent);
                    }
                }
                None
            }
            Event::Acked(pkid) => {
                let sent = self.inflight.remove(&pkid)?;
                self.max_acked = self.max_acked.max(sent.size);
                if let Subject::Caption(id) = sent.subject {
                    spool.remove(id);
                }
                if sent.offline {
                    self.offline_acked = true;
                }
                self.strikes.remove(&sent.subject);
                None
            }
            Event::Refused { pkid, reason } => {
                let sent = self.inflight.remove(&pkid)?;
                self.strikes.remove(&sent.subject);
                let why = format!("the broker refused it ({reason})");
                match sent.subject {
                    Subject::Caption(id) => self.set_aside(spool, id, sent.size, &why),
                    Subject::Topic(t) => {
                        self.stats.refused_dropped += 1;
                        tracing::error!(topic = %t, bytes = sent.size, "mqtt: message dropped: {why}");
                    }
                }
                if sent.offline {
                    self.offline_acked = true; // answered: nothing more will come
                }
                None
            }
            Event::Message { topic, payload } => self.message(topic, payload),
            Event::Other => None,
            Event::Lost(cause) => {
                self.lost(cause, now, spool, wire);
                None
            }
        }
    }

    fn message(&mut self, topic: String, payload: Vec<u8>) -> Option<Inbound> {
        if topic == self.s.cmd_topic {
            if payload.len() > MAX_COMMAND_BYTES {
                self.stats.incoming_dropped += 1;
                if !self.big_command_logged {
                    self.big_command_logged = true;
                    tracing::warn!(
                        topic = %topic,
                        bytes = payload.len(),
                        "mqtt: message on the command topic ignored: commands are short words (caption, pause, resume); \
                         a retained one comes back on every reconnect: remove it with mosquitto_pub -r -n -t TOPIC (logged once)"
                    );
                }
                return None;
            }
            return Some(Inbound::Command(String::from_utf8_lossy(&payload).trim().to_string()));
        }
        if self.s.ha_status_topic.as_deref() == Some(topic.as_str()) && String::from_utf8_lossy(&payload).trim() == "online" {
            return Some(Inbound::HomeAssistantOnline);
        }
        None
    }

    /// The connection has held long enough: back to normal.
    fn held(&mut self) {
        if self.careful || self.failures > 0 {
            tracing::info!(broker = %self.s.endpoint, "mqtt: connection stable");
        }
        self.backoff.reset();
        self.careful = false;
        self.failures = 0;
        self.stats.last_error = None;
    }

    fn lost(&mut self, cause: Cause, now: Instant, spool: &mut Spool, wire: &mut dyn Wire) {
        let held = match self.state {
            State::Up { since } => Some(now.duration_since(since)),
            _ => None,
        };
        if held.is_some_and(|h| h >= STABLE) {
            self.held();
        }
        let mut text = cause.text.clone();
        if held.is_some() {
            self.stats.reconnects += 1;
            if cause.kind == CauseKind::Closed {
                text = self.blame(now, spool, &text, held.unwrap_or_default());
            }
        }
        if let CauseKind::IncomingTooLarge(_) = cause.kind {
            self.incoming_strikes += 1;
            if self.incoming_strikes >= INCOMING_STRIKES && self.subscribe_cmd {
                self.subscribe_cmd = false;
                wire.unsubscribe(&self.s.cmd_topic);
                tracing::error!(topic = %self.s.cmd_topic, "mqtt: commands are off until restart: the broker keeps sending a message over mqtt.max_incoming_bytes (see above)");
            }
        }
        self.failures += 1;
        let wait = if cause.kind == CauseKind::Permanent { self.backoff.max() } else { self.backoff.next_wait() };
        self.state = State::Down { retry_at: now + wait };
        self.requested.clear();
        self.inflight.clear();
        self.outbox.clear();
        let retry_in_ms = wait.as_millis() as u64;
        let attempt = self.failures;
        if let Some(h) = held {
            tracing::warn!(after_ms = h.as_millis() as u64, retry_in_ms, attempt, "{text}");
        } else if self.last_logged.as_deref() != Some(text.as_str()) || attempt.is_multiple_of(LOG_EVERY) {
            if cause.kind == CauseKind::Permanent {
                tracing::error!(retry_in_ms, attempt, "{text}");
            } else {
                tracing::warn!(retry_in_ms, attempt, "{text}");
            }
        } else {
            tracing::debug!(retry_in_ms, attempt, "{text}");
        }
        self.last_logged = Some(text.clone());
        self.stats.last_error = Some(text);
    }

    /// The broker hung up: strikes the publishes written shortly before and unacknowledged;
    /// refuses those struck often enough. Once one was refused, a lone suspect larger than
    /// anything the broker ever acknowledged is refused at its first strike: the broker is
    /// known to hang up on sizes, and it lies between the two. Returns the cause's text with
    /// what was in flight.
    fn blame(&mut self, now: Instant, spool: &mut Spool, text: &str, held: Duration) -> String {
        let mut suspects: Vec<Sent> = self.inflight.values().filter(|s| now.duration_since(s.at) <= SUSPECT).cloned().collect();
        suspects.sort_by_key(|s| s.at);
        if suspects.is_empty() {
            return format!(
                "{text} {} ms after CONNACK with nothing unacknowledged (another client with the same client id? the broker's limits?)",
                held.as_millis()
            );
        }
        self.careful = true;
        let sizes: Vec<String> = suspects.iter().map(|s| s.size.to_string()).collect();
        let lone = suspects.len() == 1;
        for s in suspects.iter() {
            let n = self.strikes.entry(s.subject.clone()).or_insert(0);
            *n += 1;
            let by_size = lone && self.limit.is_some() && s.size > self.max_acked;
            if *n < self.s.dead_letter_after && !by_size {
                continue;
            }
            let n = *n;
            self.strikes.remove(&s.subject);
            self.limit = Some(self.limit.map_or(s.size, |l| l.min(s.size)));
            let why = if by_size && n < self.s.dead_letter_after {
                format!(
                    "the broker closed the connection right after it, and it is larger than anything the broker acknowledged ({} bytes) \
                     while one larger was refused; set mqtt.max_payload_bytes below the broker's limit",
                    self.max_acked
                )
            } else {
                format!(
                    "the broker closed the connection right after it {n} times (over its maximum packet size? set mqtt.max_payload_bytes below the broker's limit)"
                )
            };
            match &s.subject {
                Subject::Caption(id) => {
                    self.stats.oversize_dropped += 1;
                    self.set_aside(spool, *id, s.size, &why);
                }
                Subject::Topic(t) => {
                    self.stats.refused_dropped += 1;
                    tracing::error!(topic = %t, bytes = s.size, "mqtt: message refused: {why}; messages this large are not sent from now on");
                }
            }
        }
        format!("{text} right after a publish of {} bytes, unacknowledged (sending one at a time now)", sizes.join("/"))
    }

    /// Moves a caption the broker cannot take to the dead-letter folder (one error line).
    fn set_aside(&mut self, spool: &mut Spool, id: u64, size: usize, why: &str) {
        match spool.dead_letter(id) {
            Ok(path) => tracing::error!(id, bytes = size, file = %path.display(), "mqtt: caption set aside in the dead-letter folder: {why}"),
            Err(e) => tracing::error!(id, bytes = size, error = %e, "mqtt: caption cannot be delivered ({why}) nor set aside: given up"),
        }
    }
}
