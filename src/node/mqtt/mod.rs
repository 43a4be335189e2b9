//! The MQTT link: delivers the spool in order, at least once, over rumqttc.
//!
//! rumqttc alone loses messages (it drops its in-flight queue when the broker has no stored
//! session), spins without backoff on errors and forgets subscriptions on reconnect. So each
//! connection attempt gets a fresh client whose event loop runs on its own thread until its
//! first error, and the [`Session`] state machine decides when to try again and what to send
//! (see `session.rs` for the rules). The [`Link`] owns both and runs one step of the loop at
//! a time for the publisher thread.

pub mod cause;
pub mod client;
pub mod session;
#[cfg(test)]
mod tests;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

pub use cause::{Cause, CauseKind, Endpoint};
pub use client::{from_v4, from_v5, qos};
pub use session::{Event, Inbound, LinkStats, Session, Settings, Wire};

use super::backoff::Backoff;
use super::config::{MqttVersion, NodeConfig};
use super::lock;
use super::spool::Spool;
use crate::error::Result;

/// The link to the broker; see the module documentation.
pub struct Link {
    opts: client::Options,
    endpoint: Endpoint,
    session: Session,
    client: Option<client::Client>,
    /// Connection attempts so far; events carry the attempt they belong to.
    attempt: u64,
    events_tx: Sender<(u64, Event)>,
    events: Receiver<(u64, Event)>,
}

/// Stands in for the client between connections (nothing is sent then).
struct NoWire;

impl Wire for NoWire {
    fn publish(&mut self, _: &str, _: rumqttc::QoS, _: bool, _: Vec<u8>) -> bool {
        false
    }
    fn subscribe(&mut self, _: &str, _: rumqttc::QoS) -> bool {
        false
    }
    fn unsubscribe(&mut self, _: &str) -> bool {
        false
    }
}

impl Link {
    /// Builds the link from the `[mqtt]` section; connects on the first [`Link::step`].
    ///
    /// Errors: [`Error::Io`] when the password file or a TLS file cannot be read,
    /// [`Error::Setting`] when the password variable is not set.
    pub fn new(cfg: &NodeConfig) -> Result<Self> {
        let m = &cfg.mqtt;
        let opts = client::Options::new(cfg)?;
        let endpoint = Endpoint { host: m.host.clone(), port: m.port, tls: m.tls.is_some() };
        let settings = Settings {
            endpoint: endpoint.clone(),
            caption_topic: cfg.topic("caption"),
            cmd_topic: cfg.topic("cmd"),
            ha_status_topic: m.ha_discovery.then(|| format!("{}/status", m.discovery_prefix)),
            qos: qos(m.qos),
            window: m.inflight,
            max_payload: m.max_payload_bytes,
            dead_letter_after: m.dead_letter_after,
            v5: m.version == MqttVersion::V5,
        };
        let (events_tx, events) = crossbeam_channel::unbounded();
        let backoff = Backoff::new(m.backoff_min_ms, m.backoff_max_ms);
        Ok(Link { opts, endpoint, session: Session::new(settings, backoff, Instant::now()), client: None, attempt: 0, events_tx, events })
    }

    /// Connected (CONNACK received, connection not lost since).
    pub fn connected(&self) -> bool {
        self.session.connected()
    }

    /// Captions sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.session.unacked()
    }

    /// Counters for `…/stats`.
    pub fn stats(&self) -> LinkStats {
        self.session.stats()
    }

    /// Queues a non-caption message (status, stats, discovery) on this connection; dropped
    /// when not connected (these are state: the next one replaces them).
    pub fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.session.queue(topic, retain, payload);
    }

    /// Whether a message of `payload` bytes on `topic` is under the broker's packet size
    /// limit, as far as it is known (advertised in CONNACK, or learned from refusals).
    pub fn fits(&self, topic: &str, payload: usize) -> bool {
        self.session.fits(topic, payload)
    }

    /// Queues the retained `offline` sent at shutdown; see [`Link::offline_acked`].
    pub fn publish_offline(&mut self, topic: &str) {
        self.session.queue_offline(topic);
    }

    /// The broker acknowledged the `offline` of [`Link::publish_offline`].
    pub fn offline_acked(&self) -> bool {
        self.session.offline_acked()
    }

    /// One turn of the link: connects when due, sends what fits, then waits up to `max_wait`
    /// for a connection event (handled) or a message on `wake` (new captions).
    pub fn step(&mut self, spool: &Mutex<Spool>, wake: &Receiver<()>, max_wait: Duration) -> Option<Inbound> {
        let now = Instant::now();
        if self.client.is_none() && self.session.due(now) {
            self.connect();
        }
        if let Some(c) = self.client.as_mut() {
            self.session.pump(now, &mut lock(spool), c);
        }
        let wait = self.session.until_due(now).map_or(max_wait, |d| d.min(max_wait));
        let events = self.events.clone();
        select! {
            recv(events) -> ev => ev.ok().and_then(|ev| self.handle(ev, spool)),
            recv(wake) -> _ => None,
            default(wait) => None,
        }
    }

    /// Waits up to `max_wait` for the connection's events only (shutdown: the `offline` PUBACK).
    pub fn settle(&mut self, spool: &Mutex<Spool>, max_wait: Duration) {
        let end = Instant::now() + max_wait;
        while !self.offline_acked() && self.connected() {
            let now = Instant::now();
            if now >= end {
                return;
            }
            if let Some(c) = self.client.as_mut() {
                self.session.pump(now, &mut lock(spool), c);
            }
            if let Ok(ev) = self.events.recv_timeout((end - now).min(Duration::from_millis(100))) {
                self.handle(ev, spool);
            }
        }
    }

    fn handle(&mut self, (attempt, ev): (u64, Event), spool: &Mutex<Spool>) -> Option<Inbound> {
        if attempt != self.attempt {
            return None; // from a connection already given up
        }
        let lost = matches!(ev, Event::Lost(_));
        let now = Instant::now();
        let inbound = match self.client.as_mut() {
            Some(c) => self.session.handle(ev, now, &mut lock(spool), c),
            None => self.session.handle(ev, now, &mut lock(spool), &mut NoWire),
        };
        if lost {
            self.client = None;
        }
        inbound
    }

    /// Starts a connection attempt: a fresh client whose event loop runs on its own thread.
    fn connect(&mut self) {
        self.attempt += 1;
        match self.opts.connect(self.attempt, self.events_tx.clone(), self.endpoint.clone()) {
            Ok(c) => {
                self.client = Some(c);
                self.session.connecting();
            }
            Err(e) => {
                let cause = Cause::new(CauseKind::Other, format!("mqtt: cannot start the connection thread: {e}"));
                let _ = self.events_tx.send((self.attempt, Event::Lost(cause)));
            }
        }
    }

    /// Sends DISCONNECT (so the broker does not publish the last will) and drops the client.
    pub fn disconnect(&mut self) {
        if let Some(c) = self.client.take() {
            c.disconnect();
        }
    }
}
