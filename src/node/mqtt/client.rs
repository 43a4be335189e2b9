//! The rumqttc side of the link: options, one client per connection attempt (MQTT 3.1.1 or
//! MQTT 5) whose event loop runs on its own thread, and the translation of its events and
//! errors into the session's [`Event`]s.

use std::time::Duration;

use crossbeam_channel::Sender;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Outgoing, Packet, QoS};

use super::cause::{self, Cause, CauseKind, Endpoint};
use super::session::{Event, Wire};
use crate::error::{Error, Result};
use crate::node::config::{MqttVersion, NodeConfig};

/// Connection options for either protocol version.
#[derive(Clone)]
pub enum Options {
    V4(Box<rumqttc::MqttOptions>),
    V5(Box<rumqttc::v5::MqttOptions>),
}

/// The client of the current connection.
pub enum Client {
    V4(rumqttc::Client),
    V5(rumqttc::v5::Client),
}

fn qos5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// QoS from its number (0, 1 or 2; anything else is taken as 1).
pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

impl Options {
    /// From the `[mqtt]` section.
    ///
    /// Errors: [`Error::Io`] when the password file or a TLS file cannot be read,
    /// [`Error::Setting`] when the password variable is not set.
    pub fn new(cfg: &NodeConfig) -> Result<Self> {
        let m = &cfg.mqtt;
        let credentials = match &m.username {
            Some(user) => Some((user.clone(), cfg.password()?.unwrap_or_default())),
            None => None,
        };
        let transport = match &m.tls {
            None => None,
            Some(t) => {
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
                Some(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple { ca, alpn: None, client_auth }))
            }
        };
        let (id, keep_alive, status) = (cfg.client_id(), Duration::from_secs(m.keep_alive_s), cfg.topic("status"));
        let will_qos = qos(m.qos.max(1));
        // Incoming and outgoing limits apart: a big retained message on a subscribed topic
        // must not end the connection (the session drops it instead).
        let incoming = m.max_incoming_bytes.max(m.max_payload_bytes) + 4096;
        let capacity = m.inflight + 16;
        Ok(match m.version {
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(id, m.host.clone(), m.port);
                o.set_keep_alive(keep_alive);
                // A clean session: the spool, not the broker, holds what is not yet delivered.
                o.set_clean_session(true);
                o.set_last_will(rumqttc::LastWill::new(status, "offline", will_qos, true));
                o.set_max_packet_size(incoming, m.max_payload_bytes + 4096);
                o.set_inflight((m.inflight + 8).min(u16::MAX as usize) as u16);
                o.set_request_channel_capacity(capacity);
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                Options::V4(Box::new(o))
            }
            MqttVersion::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(id, m.host.clone(), m.port);
                o.set_keep_alive(keep_alive);
                o.set_clean_start(true);
                o.set_last_will(p5::LastWill::new(status, "offline", qos5(will_qos), true, None));
                // Sent in CONNECT: the broker must not send us bigger packets (it drops them).
                o.set_max_packet_size(Some(incoming.min(u32::MAX as usize) as u32));
                o.set_outgoing_inflight_upper_limit((m.inflight + 8).min(u16::MAX as usize) as u16);
                o.set_request_channel_capacity(capacity);
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                Options::V5(Box::new(o))
            }
        })
    }

    /// Starts a connection: a fresh client, and its event loop on a thread that reports
    /// events tagged with `attempt` until the connection ends.
    ///
    /// Errors: the thread cannot be started.
    pub fn connect(&self, attempt: u64, tx: Sender<(u64, Event)>, at: Endpoint) -> std::io::Result<Client> {
        match self {
            Options::V4(o) => {
                let (client, mut conn) = rumqttc::Client::new((**o).clone(), o.request_channel_capacity());
                spawn(attempt, tx, move |connected| match conn.recv() {
                    Ok(Ok(ev)) => Some(from_v4(ev)),
                    Ok(Err(e)) => Some(Some(Event::Lost(cause::describe(&e, &at, connected)))),
                    Err(_) => None,
                })?;
                Ok(Client::V4(client))
            }
            Options::V5(o) => {
                let (client, mut conn) = rumqttc::v5::Client::new((**o).clone(), 16);
                spawn(attempt, tx, move |connected| match conn.recv() {
                    Ok(Ok(ev)) => Some(from_v5(ev)),
                    Ok(Err(e)) => Some(Some(Event::Lost(cause::describe_v5(&e, &at, connected)))),
                    Err(_) => None,
                })?;
                Ok(Client::V5(client))
            }
        }
    }
}

/// The connection thread: forwards events until the first error, then ends; the session
/// decides when to try again. `next` returns `None` once the client is gone, `Some(None)`
/// for events the session does not need. A panic in rumqttc ends this connection, not the
/// daemon, and is reported like any other loss.
fn spawn(attempt: u64, tx: Sender<(u64, Event)>, mut next: impl FnMut(bool) -> Option<Option<Event>> + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new().name("mqtt-conn".into()).spawn(move || {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut connected = false;
            while let Some(ev) = next(connected) {
                let Some(ev) = ev else { continue };
                connected |= matches!(ev, Event::ConnAck { .. });
                let end = matches!(ev, Event::Lost(_));
                if tx.send((attempt, ev)).is_err() || end {
                    return;
                }
            }
        }));
        if let Err(p) = run {
            let msg = crate::node::panic_text(&*p);
            let _ = tx.send((attempt, Event::Lost(Cause::new(CauseKind::Other, format!("mqtt: the connection thread panicked: {msg}")))));
        }
    })?;
    Ok(())
}

impl Client {
    /// Sends DISCONNECT, so that the broker does not publish the last will.
    pub fn disconnect(&self) {
        // A full request queue only means the will may be published: nothing to do about it.
        let sent = match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        };
        if !sent {
            tracing::debug!("mqtt: DISCONNECT not sent (request queue full)");
        }
    }
}

impl Wire for Client {
    fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        match self {
            Client::V4(c) => c.try_publish(topic, qos, retain, payload).is_ok(),
            Client::V5(c) => c.try_publish(topic, qos5(qos), retain, payload).is_ok(),
        }
    }
    fn subscribe(&mut self, topic: &str, qos: QoS) -> bool {
        match self {
            Client::V4(c) => c.try_subscribe(topic, qos).is_ok(),
            Client::V5(c) => c.try_subscribe(topic, qos5(qos)).is_ok(),
        }
    }
    fn unsubscribe(&mut self, topic: &str) -> bool {
        match self {
            Client::V4(c) => c.try_unsubscribe(topic).is_ok(),
            Client::V5(c) => c.try_unsubscribe(topic).is_ok(),
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

/// rumqttc's MQTT 5 events as the session's: the broker's Maximum Packet Size from CONNACK,
/// and acknowledgements whose reason code says the message was refused.
pub fn from_v5(ev: rumqttc::v5::Event) -> Option<Event> {
    use rumqttc::v5::Event as E;
    Some(match ev {
        E::Incoming(p5::Packet::ConnAck(a)) => Event::ConnAck { max_packet: a.properties.and_then(|p| p.max_packet_size).map(|m| m as usize) },
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Written(pkid),
        E::Incoming(p5::Packet::PubAck(a)) => match a.reason {
            p5::PubAckReason::Success | p5::PubAckReason::NoMatchingSubscribers => Event::Acked(a.pkid),
            r => Event::Refused { pkid: a.pkid, reason: format!("{r:?}") },
        },
        E::Incoming(p5::Packet::PubRec(a)) => match a.reason {
            p5::PubRecReason::Success | p5::PubRecReason::NoMatchingSubscribers => Event::Other,
            r => Event::Refused { pkid: a.pkid, reason: format!("{r:?}") },
        },
        E::Incoming(p5::Packet::PubComp(a)) => Event::Acked(a.pkid),
        E::Incoming(p5::Packet::Publish(p)) => Event::Message { topic: String::from_utf8_lossy(&p.topic).into_owned(), payload: p.payload.to_vec() },
        E::Incoming(_) => Event::Other,
        E::Outgoing(_) => return None,
    })
}
