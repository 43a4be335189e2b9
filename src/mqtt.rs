//! The MQTT link: delivers the spool in order, at least once, over rumqttc.
//!
//! rumqttc alone loses messages (it drops its in-flight queue when the broker has no stored
//! session), spins without backoff on errors and forgets subscriptions on reconnect. So each
//! connection attempt gets a fresh client whose event loop runs on its own thread until its
//! first error; this link then waits (exponential backoff with jitter), reconnects, resubscribes
//! and replays the spool from its oldest message. A caption leaves the spool only on PUBACK.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rumqttc::{Client, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};

use crate::node_config::NodeConfig;
use crate::spool::Spool;

/// What the link passes up to the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A message on `…/cmd`.
    Command(String),
    /// Home Assistant came (back) online: discovery must be republished.
    HomeAssistantOnline,
}

/// Events from a connection thread, tagged with the attempt they belong to.
pub struct LinkEvent(u64, Result<Event, ConnectionError>);

/// What a publish request was for, matched to its packet id by rumqttc's outgoing events
/// (which come in request order).
enum Tag {
    Caption(u64),
    Offline,
    Other,
}

pub struct Link {
    opts: MqttOptions,
    qos: QoS,
    window: usize,
    max_payload: usize,
    endpoint: String,
    caption_topic: String,
    cmd_topic: String,
    ha_status_topic: Option<String>,
    client: Option<Client>,
    attempt: u64,
    events_tx: Sender<LinkEvent>,
    pub events: Receiver<LinkEvent>,
    connected: bool,
    backoff: Backoff,
    next_try: Instant,
    sent: VecDeque<Tag>,
    inflight: HashMap<u16, Tag>,
    /// Highest spool id handed to the client on this connection.
    cursor: u64,
    pub reconnects: u64,
    pub oversize: u64,
    pub offline_acked: bool,
    last_error: Option<String>,
}

pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

impl Link {
    pub fn new(cfg: &NodeConfig) -> Result<Self, String> {
        let m = &cfg.mqtt;
        let mut opts = MqttOptions::new(cfg.client_id(), m.host.clone(), m.port);
        opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
        // A clean session: the spool, not the broker, holds what is not yet delivered.
        opts.set_clean_session(true);
        opts.set_last_will(LastWill::new(cfg.topic("status"), "offline", qos(m.qos.max(1)), true));
        opts.set_max_packet_size(m.max_payload_bytes + 4096, m.max_payload_bytes + 4096);
        opts.set_inflight(m.inflight.min(u16::MAX as usize) as u16 + 4);
        if let Some(user) = &m.username {
            let pass = cfg.password()?.unwrap_or_default();
            opts.set_credentials(user.clone(), pass);
        }
        if let Some(t) = &m.tls {
            // ring is this build's only crypto provider; install it once for rustls.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let ca = std::fs::read(&t.ca_file)
                .map_err(|e| format!("mqtt.tls.ca_file {}: cannot read it: {e}", t.ca_file.display()))?;
            let client_auth = match (&t.client_cert, &t.client_key) {
                (Some(c), Some(k)) => Some((
                    std::fs::read(c).map_err(|e| format!("mqtt.tls.client_cert {}: cannot read it: {e}", c.display()))?,
                    std::fs::read(k).map_err(|e| format!("mqtt.tls.client_key {}: cannot read it: {e}", k.display()))?,
                )),
                _ => None,
            };
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple { ca, alpn: None, client_auth }));
        }
        let (events_tx, events) = crossbeam_channel::unbounded();
        Ok(Link {
            opts,
            qos: qos(m.qos),
            window: m.inflight,
            max_payload: m.max_payload_bytes,
            endpoint: format!("{}:{}{}", m.host, m.port, if m.tls.is_some() { " (TLS)" } else { "" }),
            caption_topic: cfg.topic("caption"),
            cmd_topic: cfg.topic("cmd"),
            ha_status_topic: m.ha_discovery.then(|| format!("{}/status", m.discovery_prefix)),
            client: None,
            attempt: 0,
            events_tx,
            events,
            connected: false,
            backoff: Backoff::new(m.backoff_min_ms, m.backoff_max_ms),
            next_try: Instant::now(),
            sent: VecDeque::new(),
            inflight: HashMap::new(),
            cursor: 0,
            reconnects: 0,
            oversize: 0,
            offline_acked: false,
            last_error: None,
        })
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Captions sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.sent.iter().chain(self.inflight.values()).filter(|t| matches!(t, Tag::Caption(_))).count()
    }

    /// Starts a connection attempt if none is running and the backoff has passed.
    pub fn maintain(&mut self) {
        if self.client.is_some() || Instant::now() < self.next_try {
            return;
        }
        self.attempt += 1;
        let attempt = self.attempt;
        let (client, mut connection) = Client::new(self.opts.clone(), 256);
        let tx = self.events_tx.clone();
        let spawned = std::thread::Builder::new().name("mqtt-conn".into()).spawn(move || {
            // One connection: forward events until the first error, then end; the link decides
            // when to try again.
            loop {
                match connection.recv() {
                    Ok(Ok(ev)) => {
                        if tx.send(LinkEvent(attempt, Ok(ev))).is_err() {
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        let _ = tx.send(LinkEvent(attempt, Err(e)));
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        match spawned {
            Ok(_) => self.client = Some(client),
            Err(e) => {
                tracing::error!(error = %e, "mqtt: cannot start the connection thread");
                self.next_try = Instant::now() + self.backoff.next();
            }
        }
    }

    /// How long until `maintain` has something to do (for the caller's wait).
    pub fn until_next_try(&self) -> Option<Duration> {
        self.client.is_none().then(|| self.next_try.saturating_duration_since(Instant::now()))
    }

    /// Handles one event from a connection thread; returns what the daemon must act on.
    pub fn handle(&mut self, ev: LinkEvent, spool: &mut Spool) -> Option<Inbound> {
        let LinkEvent(attempt, ev) = ev;
        if attempt != self.attempt {
            return None; // from a connection already given up
        }
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                self.connected = true;
                self.backoff.reset();
                self.last_error = None;
                self.sent.clear();
                self.inflight.clear();
                self.cursor = 0;
                tracing::info!(broker = %self.endpoint, spool = spool.len(), "mqtt: connected");
                if let Some(c) = &self.client {
                    // rumqttc forgets subscriptions on reconnect: subscribe on every ConnAck.
                    let _ = c.try_subscribe(self.cmd_topic.clone(), QoS::AtLeastOnce);
                    if let Some(t) = &self.ha_status_topic {
                        let _ = c.try_subscribe(t.clone(), QoS::AtLeastOnce);
                    }
                }
                None
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                match self.sent.pop_front() {
                    // QoS 0 has no acknowledgement: written to the socket is all it gets.
                    Some(Tag::Caption(id)) if self.qos == QoS::AtMostOnce => spool.remove(id),
                    Some(Tag::Offline) if pkid == 0 => self.offline_acked = true,
                    Some(tag) if pkid != 0 => {
                        self.inflight.insert(pkid, tag);
                    }
                    _ => {}
                }
                None
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                self.acked(ack.pkid, spool);
                None
            }
            Ok(Event::Incoming(Packet::PubComp(ack))) => {
                self.acked(ack.pkid, spool);
                None
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let text = String::from_utf8_lossy(&p.payload).trim().to_string();
                if p.topic == self.cmd_topic {
                    Some(Inbound::Command(text))
                } else if self.ha_status_topic.as_deref() == Some(p.topic.as_str()) && text == "online" {
                    Some(Inbound::HomeAssistantOnline)
                } else {
                    None
                }
            }
            Ok(_) => None,
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    fn acked(&mut self, pkid: u16, spool: &mut Spool) {
        match self.inflight.remove(&pkid) {
            Some(Tag::Caption(id)) => spool.remove(id),
            Some(Tag::Offline) => self.offline_acked = true,
            _ => {}
        }
    }

    fn fail(&mut self, e: ConnectionError) {
        let was_connected = self.connected;
        self.connected = false;
        self.client = None;
        self.sent.clear();
        self.inflight.clear();
        if was_connected {
            self.reconnects += 1;
        }
        let (msg, permanent) = describe_error(&e, &self.endpoint);
        let wait = if permanent { self.backoff.max() } else { self.backoff.next() };
        self.next_try = Instant::now() + wait;
        // The same error over and over is logged once at its level, then at debug.
        if self.last_error.as_deref() == Some(msg.as_str()) {
            tracing::debug!(retry_in_ms = wait.as_millis() as u64, "{msg}");
        } else if permanent {
            tracing::error!(retry_in_ms = wait.as_millis() as u64, "{msg}");
        } else {
            tracing::warn!(retry_in_ms = wait.as_millis() as u64, "{msg}");
        }
        self.last_error = Some(msg);
    }

    /// Sends spooled captions, oldest first, keeping at most `window` unacknowledged.
    pub fn pump(&mut self, spool: &mut Spool) {
        let Some(client) = self.client.as_ref().filter(|_| self.connected) else { return };
        while self.sent.len() + self.inflight.len() < self.window {
            let Some(id) = spool.next_after(self.cursor) else { break };
            let Some(payload) = spool.read(id) else {
                spool.remove(id);
                continue;
            };
            if payload.len() > self.max_payload {
                tracing::error!(id, bytes = payload.len(), max = self.max_payload, "caption message over mqtt.max_payload_bytes: dropped from the spool");
                self.oversize += 1;
                spool.remove(id);
                continue;
            }
            if client.try_publish(self.caption_topic.clone(), self.qos, false, payload).is_err() {
                break; // request channel full: try again on the next event
            }
            self.sent.push_back(Tag::Caption(id));
            self.cursor = id;
        }
    }

    /// Publishes a non-caption message (status, stats, discovery). Not spooled: these are
    /// state, and the next one replaces them.
    pub fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.publish_tagged(topic, QoS::AtMostOnce, retain, payload, Tag::Other);
    }

    /// The retained `offline` sent at shutdown; `offline_acked` turns true when it is through.
    pub fn publish_offline(&mut self, topic: &str) {
        self.offline_acked = false;
        self.publish_tagged(topic, QoS::AtLeastOnce, true, b"offline".to_vec(), Tag::Offline);
    }

    fn publish_tagged(&mut self, topic: &str, q: QoS, retain: bool, payload: Vec<u8>, tag: Tag) {
        if let Some(c) = self.client.as_ref().filter(|_| self.connected) {
            if c.try_publish(topic.to_string(), q, retain, payload).is_ok() {
                self.sent.push_back(tag);
            }
        }
    }

    pub fn disconnect(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.try_disconnect();
        }
        self.connected = false;
    }
}

/// One line for a connection error, and whether retrying soon is pointless.
fn describe_error(e: &ConnectionError, endpoint: &str) -> (String, bool) {
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => (
            format!("mqtt: broker {endpoint} refused the login: bad user name or password; check mqtt.username and mqtt.password_file/password_env"),
            true,
        ),
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => (
            format!("mqtt: broker {endpoint} refused the login: not authorized; check mqtt.username, the password and the broker's ACL"),
            true,
        ),
        ConnectionError::ConnectionRefused(code) => (format!("mqtt: broker {endpoint} refused the connection: {code:?}"), true),
        ConnectionError::Tls(t) => (
            format!("mqtt: TLS with {endpoint} failed: {}; check mqtt.tls.ca_file (it must sign the broker's certificate, issued for mqtt.host)", crate::error::one_line(&t.to_string())),
            true,
        ),
        ConnectionError::Io(io) => (format!("mqtt: broker {endpoint}: {}", crate::error::one_line(&io.to_string())), false),
        other => (format!("mqtt: connection to {endpoint} lost: {}", crate::error::one_line(&other.to_string())), false),
    }
}

/// Exponential backoff with full jitter between `min` and the current ceiling.
pub struct Backoff {
    min: u64,
    max: u64,
    ceiling: u64,
    seed: u64,
}

impl Backoff {
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1;
        Backoff { min: min_ms, max: max_ms.max(min_ms), ceiling: min_ms, seed }
    }
    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max)
    }
    pub fn next(&mut self) -> Duration {
        // xorshift: jitter only needs to spread nodes apart, not be unpredictable.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let span = self.ceiling - self.min / 2;
        let wait = self.min / 2 + self.seed % (span + 1);
        self.ceiling = (self.ceiling.saturating_mul(2)).min(self.max);
        Duration::from_millis(wait)
    }
}
