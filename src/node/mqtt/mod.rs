//! The MQTT link: delivers the spool in order, at least once, over rumqttc.
//!
//! rumqttc alone loses messages (it drops its in-flight queue when the broker has no stored
//! session), spins without backoff on errors and forgets subscriptions on reconnect. So each
//! connection attempt gets a fresh client whose event loop runs on its own thread until its
//! first error, and the [`Session`] state machine decides when to try again and what to send
//! (see `session.rs` for the rules). The [`Link`] owns both and runs one step of the loop at
//! a time for the publisher thread.

pub mod cause;
pub mod session;
#[cfg(test)]
mod tests;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use rumqttc::{Client, LastWill, MqttOptions, Outgoing, Packet, QoS};

pub use cause::{Cause, CauseKind, Endpoint};
pub use session::{Event, Inbound, LinkStats, Session, Settings, Wire};

use super::backoff::Backoff;
use super::config::NodeConfig;
use super::spool::Spool;
use super::lock;
use crate::error::{Error, Result};

/// QoS from its number (0, 1 or 2; anything else is taken as 1).
pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// The link to the broker; see the module documentation.
pub struct Link {
    opts: MqttOptions,
    endpoint: Endpoint,
    session: Session,
    client: Option<Client>,
    /// Connection attempts so far; events carry the attempt they belong to.
    attempt: u64,
    events_tx: Sender<(u64, Event)>,
    events: Receiver<(u64, Event)>,
}

struct ClientWire<'a>(&'a Client);

impl Wire for ClientWire<'_> {
    fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        self.0.try_publish(topic, qos, retain, payload).is_ok()
    }
    fn subscribe(&mut self, topic: &str, qos: QoS) -> bool {
        self.0.try_subscribe(topic, qos).is_ok()
    }
    fn unsubscribe(&mut self, topic: &str) -> bool {
        self.0.try_unsubscribe(topic).is_ok()
    }
}

/// Stands in for the client between connections (nothing is sent then).
struct NoWire;

impl Wire for NoWire {
    fn publish(&mut self, _: &str, _: QoS, _: bool, _: Vec<u8>) -> bool {
        false
    }
    fn subscribe(&mut self, _: &str, _: QoS) -> bool {
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
        let mut opts = MqttOptions::new(cfg.client_id(), m.host.clone(), m.port);
        opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
        // A clean session: the spool, not the broker, holds what is not yet delivered.
        opts.set_clean_session(true);
        opts.set_last_will(LastWill::new(cfg.topic("status"), "offline", qos(m.qos.max(1)), true));
        // Incoming and outgoing limits apart: a big retained message on a subscribed topic
        // must not end the connection (it is dropped by the session instead).
        let incoming = m.max_incoming_bytes.max(m.max_payload_bytes) + 4096;
        opts.set_max_packet_size(incoming, m.max_payload_bytes + 4096);
        opts.set_inflight((m.inflight + 8).min(u16::MAX as usize) as u16);
        opts.set_request_channel_capacity(m.inflight + 16);
        if let Some(user) = &m.username {
            let pass = cfg.password()?.unwrap_or_default();
            opts.set_credentials(user.clone(), pass);
        }
        if let Some(t) = &m.tls {
            // ring is this build's only crypto provider; install it once for rustls.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let ca = std::fs::read(&t.ca_file).map_err(|e| Error::io(&t.ca_file, "read mqtt.tls.ca_file", e))?;
            let client_auth = match (&t.client_cert, &t.client_key) {
                (Some(c), Some(k)) => Some((
                    std::fs::read(c).map_err(|e| Error::io(c, "read mqtt.tls.client_cert", e))?,
                    std::fs::read(k).map_err(|e| Error::io(k, "read mqtt.tls.client_key", e))?,
                )),
                _ => None,
            };
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple { ca, alpn: None, client_auth }));
        }
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
        if let Some(c) = &self.client {
            self.session.pump(now, &mut lock(spool), &mut ClientWire(c));
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
            if let Some(c) = &self.client {
                self.session.pump(now, &mut lock(spool), &mut ClientWire(c));
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
        let inbound = match &self.client {
            Some(c) => self.session.handle(ev, now, &mut lock(spool), &mut ClientWire(c)),
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
        let attempt = self.attempt;
        let (client, mut connection) = Client::new(self.opts.clone(), self.opts.request_channel_capacity());
        let tx = self.events_tx.clone();
        let endpoint = self.endpoint.clone();
        let spawned = std::thread::Builder::new().name("mqtt-conn".into()).spawn(move || {
            // Forward events until the first error, then end; the session decides when to
            // try again. A panic in rumqttc ends this connection, not the daemon, and is
            // reported like any other loss.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut connected = false;
                loop {
                    let ev = match connection.recv() {
                        Ok(Ok(ev)) => from_v4(ev),
                        Ok(Err(e)) => Some(Event::Lost(cause::describe(&e, &endpoint, connected))),
                        // The client was dropped (shutdown or a newer attempt).
                        Err(_) => return,
                    };
                    let Some(ev) = ev else { continue };
                    connected |= matches!(ev, Event::ConnAck { .. });
                    let end = matches!(ev, Event::Lost(_));
                    if tx.send((attempt, ev)).is_err() || end {
                        return;
                    }
                }
            }));
            if let Err(p) = run {
                let msg = super::panic_text(&p);
                let _ = tx.send((attempt, Event::Lost(Cause::new(CauseKind::Other, format!("mqtt: the connection thread panicked: {msg}")))));
            }
        });
        match spawned {
            Ok(_) => {
                self.client = Some(client);
                self.session.connecting();
            }
            Err(e) => {
                let cause = Cause::new(CauseKind::Other, format!("mqtt: cannot start the connection thread: {e}"));
                let _ = self.events_tx.send((attempt, Event::Lost(cause)));
            }
        }
    }

    /// Sends DISCONNECT (so the broker does not publish the last will) and drops the client.
    pub fn disconnect(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.try_disconnect();
        }
    }
}

/// rumqttc's MQTT 3.1.1 events as the session's; `None` for those it does not need.
pub fn from_v4(ev: rumqttc::Event) -> Option<Event> {
    use rumqttc::Event as E;
    Some(match ev {
        // rumqttc reports a refused CONNACK as an error, so this one was accepted.
        E::Incoming(Packet::ConnAck(_)) => Event::ConnAck { max_packet: None },
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Written(pkid),
        E::Incoming(Packet::PubAck(a)) => Event::Acked(a.pkid),
        E::Incoming(Packet::PubComp(a)) => Event::Acked(a.pkid),
        E::Incoming(Packet::Publish(p)) => Event::Message { topic: p.topic, payload: p.payload.to_vec() },
        E::Incoming(_) => Event::Other,
        E::Outgoing(_) => return None,
    })
}
