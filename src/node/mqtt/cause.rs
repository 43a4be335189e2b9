//! Why a connection ended, in one line that names the likely fix.

use rumqttc::{ConnectReturnCode, ConnectionError, StateError};

use crate::error::one_line;

/// What kind of failure ended a connection; decides the wait and what gets blamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CauseKind {
    /// Credentials, authorization, TLS set-up: retrying soon cannot help, so the longest wait.
    Permanent,
    /// The broker sent a packet over `mqtt.max_incoming_bytes` (bytes in the payload).
    IncomingTooLarge(usize),
    /// The broker hung up (reset, end of stream): possibly because of what was just sent.
    Closed,
    /// Anything else (unreachable host, timeouts, protocol errors).
    Other,
}

/// One line for the log and `…/stats`, and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub text: String,
    pub kind: CauseKind,
}

impl Cause {
    pub fn new(kind: CauseKind, text: impl Into<String>) -> Self {
        Cause { text: text.into(), kind }
    }
}

/// Where the link connects, for the messages.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}{}", self.host, self.port, if self.tls { " (TLS)" } else { "" })
    }
}

/// Maps rumqttc's error to a cause. `connected`: the error came after CONNACK.
pub fn describe(e: &ConnectionError, at: &Endpoint, connected: bool) -> Cause {
    use CauseKind::*;
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => Cause::new(
            Permanent,
            format!("mqtt: broker {at} refused the login: bad user name or password; check mqtt.username and mqtt.password_file/password_env"),
        ),
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => Cause::new(
            Permanent,
            format!("mqtt: broker {at} refused the login: not authorized; check mqtt.username, the password and the broker's ACL"),
        ),
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId) => {
            Cause::new(Permanent, format!("mqtt: broker {at} refused the client id; set mqtt.client_id to letters and digits"))
        }
        ConnectionError::ConnectionRefused(code) => Cause::new(Permanent, format!("mqtt: broker {at} refused the connection: {code:?}")),
        ConnectionError::Tls(t) => tls(&one_line(&t.to_string()), at),
        ConnectionError::MqttState(StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n))) => Cause::new(
            IncomingTooLarge(*n),
            format!(
                "mqtt: broker {at} sent a {n}-byte message, over mqtt.max_incoming_bytes: most likely a retained message on a subscribed topic \
                 (the command topic or Home Assistant's status); remove it (mosquitto_pub -r -n -t TOPIC) or raise mqtt.max_incoming_bytes"
            ),
        ),
        ConnectionError::MqttState(StateError::AwaitPingResp) => {
            Cause::new(Other, format!("mqtt: broker {at} stopped answering (no PINGRESP within mqtt.keep_alive_s): network or broker down"))
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => closed(at, connected, "end of stream"),
        ConnectionError::MqttState(StateError::Io(io))
        | ConnectionError::MqttState(StateError::Deserialization(rumqttc::mqttbytes::Error::Io(io)))
        | ConnectionError::Io(io) => io_error(io, at, connected),
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => {
            Cause::new(Other, format!("mqtt: no answer from {at} in time: is mqtt.host right, and is a firewall dropping packets?"))
        }
        ConnectionError::NotConnAck(p) => {
            Cause::new(Other, format!("mqtt: {at} answered CONNECT with {p:?}, not CONNACK: is this port an MQTT broker?"))
        }
        other => Cause::new(Other, format!("mqtt: connection to {at} lost: {}", one_line(&other.to_string()))),
    }
}

/// The same for the MQTT 5 client, whose broker can also say why it disconnects.
pub fn describe_v5(e: &rumqttc::v5::ConnectionError, at: &Endpoint, connected: bool) -> Cause {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C, DisconnectReasonCode as D};
    use rumqttc::v5::{ConnectionError as E, StateError as S};
    use CauseKind::*;
    let refused = |what: &str| Cause::new(Permanent, format!("mqtt: broker {at} refused the login: {what}"));
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => refused("bad user name or password; check mqtt.username and mqtt.password_file/password_env"),
        E::ConnectionRefused(C::NotAuthorized) => refused("not authorized; check mqtt.username, the password and the broker's ACL"),
        E::ConnectionRefused(C::ClientIdentifierNotValid) => refused("client id not valid; set mqtt.client_id to letters and digits"),
        E::ConnectionRefused(C::UnsupportedProtocolVersion) => {
            Cause::new(Permanent, format!("mqtt: broker {at} does not speak MQTT 5: set mqtt.version = \"3.1.1\""))
        }
        E::ConnectionRefused(code) => Cause::new(Permanent, format!("mqtt: broker {at} refused the connection: {code:?}")),
        E::Tls(t) => tls(&one_line(&t.to_string()), at),
        E::MqttState(S::Deserialization(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. })) | E::MqttState(S::IncomingPacketTooLarge { pkt_size, .. }) => {
            Cause::new(IncomingTooLarge(*pkt_size), format!("mqtt: broker {at} sent a {pkt_size}-byte packet, over mqtt.max_incoming_bytes"))
        }
        E::MqttState(S::ServerDisconnect { reason_code, reason_string }) => {
            let why = reason_string.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            let kind = match reason_code {
                D::PacketTooLarge => Closed,
                D::NotAuthorized => Permanent,
                _ => Other,
            };
            let hint = match reason_code {
                D::PacketTooLarge => " (a message over the broker's maximum packet size)",
                D::SessionTakenOver => " (another client connected with the same client id: mqtt.client_id / device_id)",
                _ => "",
            };
            Cause::new(kind, format!("mqtt: broker {at} disconnected us: {reason_code:?}{why}{hint}"))
        }
        E::MqttState(S::AwaitPingResp) => {
            Cause::new(Other, format!("mqtt: broker {at} stopped answering (no PINGRESP within mqtt.keep_alive_s): network or broker down"))
        }
        E::MqttState(S::ConnectionAborted) => closed(at, connected, "end of stream"),
        E::MqttState(S::Io(io)) | E::MqttState(S::Deserialization(rumqttc::v5::mqttbytes::Error::Io(io))) | E::Io(io) => io_error(io, at, connected),
        E::Timeout(_) => Cause::new(Other, format!("mqtt: no answer from {at} in time: is mqtt.host right, and is a firewall dropping packets?")),
        other => Cause::new(Other, format!("mqtt: connection to {at} lost: {}", one_line(&other.to_string()))),
    }
}

fn tls(msg: &str, at: &Endpoint) -> Cause {
    // A plain-MQTT listener answers a TLS ClientHello with garbage or hangs up.
    let plain_port = ["InvalidContentType", "corrupt message", "eof", "EOF", "reset", "closed"].iter().any(|w| msg.contains(w));
    let hint = if plain_port {
        format!("port {} does not seem to speak TLS (plain MQTT is usually 1883, TLS 8883): use the broker's TLS port, or remove [mqtt.tls]", at.port)
    } else {
        "check mqtt.tls.ca_file (it must sign the broker's certificate, issued for mqtt.host)".to_string()
    };
    Cause::new(CauseKind::Permanent, format!("mqtt: TLS with {at} failed: {msg}; {hint}"))
}

fn io_error(io: &std::io::Error, at: &Endpoint, connected: bool) -> Cause {
    use std::io::ErrorKind::*;
    let msg = one_line(&io.to_string());
    match io.kind() {
        ConnectionRefused => Cause::new(
            CauseKind::Other,
            format!("mqtt: broker {at}: {msg}: nothing listens there; is the broker running, and are mqtt.host and mqtt.port right?"),
        ),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => closed(at, connected, &msg),
        _ if msg.contains("lookup") || msg.contains("resolve") => {
            Cause::new(CauseKind::Other, format!("mqtt: broker {at}: {msg}: cannot resolve mqtt.host"))
        }
        _ => Cause::new(CauseKind::Other, format!("mqtt: broker {at}: {msg}")),
    }
}

/// The broker hung up. Before CONNACK that is usually a protocol mismatch; after it, the
/// session decides what was sent last and names it.
fn closed(at: &Endpoint, connected: bool, what: &str) -> Cause {
    if connected {
        return Cause::new(CauseKind::Closed, format!("mqtt: broker {at} closed the connection ({what})"));
    }
    let hint = if at.tls {
        "check mqtt.client_id and the broker's log".to_string()
    } else {
        format!("if port {} expects TLS (often 8883), add [mqtt.tls]; else check mqtt.client_id and the broker's log", at.port)
    };
    Cause::new(CauseKind::Other, format!("mqtt: broker {at} closed the connection ({what}) before CONNACK: {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tls: bool) -> Endpoint {
        Endpoint { host: "h".into(), port: 1883, tls }
    }

    #[test]
    fn causes_name_the_fix() {
        let io = |k| ConnectionError::Io(std::io::Error::new(k, "x"));
        let c = describe(&io(std::io::ErrorKind::ConnectionRefused), &at(false), false);
        assert!(c.text.contains("nothing listens") && c.kind == CauseKind::Other, "{c:?}");
        let c = describe(&io(std::io::ErrorKind::ConnectionReset), &at(false), true);
        assert_eq!(c.kind, CauseKind::Closed);
        let c = describe(&io(std::io::ErrorKind::ConnectionReset), &at(false), false);
        assert!(c.text.contains("expects TLS") && c.kind == CauseKind::Other, "{c:?}");
        let big = ConnectionError::MqttState(StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(100_019)));
        let c = describe(&big, &at(false), true);
        assert_eq!(c.kind, CauseKind::IncomingTooLarge(100_019));
        assert!(c.text.contains("retained") && c.text.contains("mqtt.max_incoming_bytes"), "{c:?}");
        let c = tls("received corrupt message of type InvalidContentType", &at(true));
        assert!(c.text.contains("does not seem to speak TLS") && c.kind == CauseKind::Permanent, "{c:?}");
        let c = tls("invalid peer certificate: UnknownIssuer", &at(true));
        assert!(c.text.contains("check mqtt.tls.ca_file"), "{c:?}");
    }
}
