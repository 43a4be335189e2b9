//! The link's state machine without a broker: synthetic rumqttc events in, what it sends and
//! what leaves the spool out.

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{ConnAck, ConnectReturnCode, ConnectionError, Outgoing, Packet, PubAck, Publish, QoS};

use super::cause::{describe, Cause, CauseKind, Endpoint};
use super::{from_v4, from_v5};
use super::session::{Event, Inbound, Session, Settings, Wire, MAX_COMMAND_BYTES, STABLE};
use crate::node::backoff::Backoff;
use crate::node::config::{FsyncPolicy, SpoolSection};
use crate::node::spool::Spool;

#[derive(Default)]
struct FakeWire {
    /// (topic, qos, retain, payload) in order.
    published: Vec<(String, QoS, bool, Vec<u8>)>,
    subscribed: Vec<String>,
    unsubscribed: Vec<String>,
    full: bool,
}

impl Wire for FakeWire {
    fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        if self.full {
            return false;
        }
        self.published.push((topic.to_string(), qos, retain, payload));
        true
    }
    fn subscribe(&mut self, topic: &str, _: QoS) -> bool {
        self.subscribed.push(topic.to_string());
        true
    }
    fn unsubscribe(&mut self, topic: &str) -> bool {
        self.unsubscribed.push(topic.to_string());
        true
    }
}

impl FakeWire {
    fn captions(&self) -> Vec<String> {
        self.published.iter().filter(|p| p.0 == "t/n/caption").map(|p| String::from_utf8_lossy(&p.3).into_owned()).collect()
    }
    fn take(&mut self) -> Vec<String> {
        let c = self.captions();
        self.published.clear();
        c
    }
}

struct Rig {
    session: Session,
    spool: Spool,
    wire: FakeWire,
    now: Instant,
    _dir: tempfile::TempDir,
}

fn settings(qos: QoS, window: usize) -> Settings {
    Settings {
        endpoint: Endpoint { host: "h".into(), port: 1883, tls: false },
        caption_topic: "t/n/caption".into(),
        cmd_topic: "t/n/cmd".into(),
        ha_status_topic: Some("homeassistant/status".into()),
        qos,
        window,
        max_payload: 1000,
        dead_letter_after: 3,
        v5: false,
    }
}

impl Rig {
    fn new(qos: QoS, window: usize, captions: &[&str]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolSection { dir: dir.path().to_path_buf(), max_messages: 100, memory_max_messages: 10, fsync: FsyncPolicy::Never, replay: true };
        let mut spool = Spool::open(&cfg).unwrap();
        for c in captions {
            spool.append(c.as_bytes().to_vec());
        }
        let now = Instant::now();
        let session = Session::new(settings(qos, window), Backoff::with_seed(500, 30_000, 42), now);
        Rig { session, spool, wire: FakeWire::default(), now, _dir: dir }
    }

    fn feed(&mut self, ev: Event) -> Option<Inbound> {
        self.session.handle(ev, self.now, &mut self.spool, &mut self.wire)
    }

    /// A rumqttc event, through the same conversion as the real connection thread.
    fn v4(&mut self, ev: rumqttc::Event) -> Option<Inbound> {
        let ev = from_v4(ev).expect("an event the session uses");
        self.feed(ev)
    }

    fn pump(&mut self) {
        self.session.pump(self.now, &mut self.spool, &mut self.wire);
    }

    fn connack(&mut self) {
        assert!(self.session.due(self.now), "an attempt is due");
        self.session.connecting();
        self.v4(rumqttc::Event::Incoming(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))));
    }

    /// The last `n` requests written with packet ids `first..`.
    fn written(&mut self, first: u16, n: u16) {
        for pkid in first..first + n {
            self.v4(rumqttc::Event::Outgoing(Outgoing::Publish(pkid)));
        }
    }

    fn puback(&mut self, pkid: u16) {
        self.v4(rumqttc::Event::Incoming(Packet::PubAck(PubAck::new(pkid))));
    }

    /// The broker hangs up (connection reset), `after` after the last event.
    fn reset(&mut self, after: Duration) {
        self.now += after;
        let e = ConnectionError::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "Connection reset by peer"));
        let cause = describe(&e, &settings(QoS::AtLeastOnce, 1).endpoint, self.session.connected());
        self.feed(Event::Lost(cause));
    }

    /// Waits until the next attempt is due; returns how long that was.
    fn wait_retry(&mut self) -> Duration {
        let d = self.session.until_due(self.now).expect("down");
        self.now += d;
        d
    }

    fn left(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(id) = self.spool.next_after(at) {
            out.push(String::from_utf8(self.spool.read(id).unwrap()).unwrap());
            at = id;
        }
        out
    }
}

fn dead_letters(dir: &Path) -> usize {
    std::fs::read_dir(dir.join(crate::node::spool::DEAD_LETTER)).map(|rd| rd.count()).unwrap_or(0)
}

#[test]
fn captions_leave_the_spool_only_on_puback() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &["a", "b", "c"]);
    r.pump();
    assert!(r.wire.published.is_empty(), "nothing is sent before CONNACK");
    r.connack();
    r.pump();
    assert_eq!(r.wire.captions(), ["a", "b", "c"]);
    r.written(1, 3);
    assert_eq!(r.left(), ["a", "b", "c"], "written is not delivered");
    assert_eq!(r.session.unacked(), 3);
    r.puback(2);
    assert_eq!(r.left(), ["a", "c"]);
    r.puback(2); // a duplicate PUBACK changes nothing
    r.puback(1);
    r.puback(3);
    assert!(r.left().is_empty());
    assert_eq!(r.session.unacked(), 0);
}

#[test]
fn replay_after_reconnect_starts_from_the_oldest_in_order() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &["a", "b", "c", "d"]);
    r.connack();
    r.pump();
    r.written(1, 4);
    r.puback(2);
    r.wire.take();
    r.reset(Duration::from_secs(20)); // held long enough: a plain loss
    assert!(!r.session.connected());
    r.pump();
    assert!(r.wire.published.is_empty(), "nothing is sent while down");
    r.wait_retry();
    r.connack();
    r.pump();
    assert_eq!(r.wire.captions(), ["a", "c", "d"], "unacknowledged ones again, oldest first");
    assert_eq!(r.session.stats().reconnects, 1);
    assert_eq!(r.session.stats().connections, 2);
}

#[test]
fn the_in_flight_window_holds() {
    let mut r = Rig::new(QoS::AtLeastOnce, 2, &["a", "b", "c", "d", "e"]);
    r.connack();
    r.pump();
    assert_eq!(r.wire.take(), ["a", "b"]);
    r.written(1, 2);
    r.pump();
    assert!(r.wire.take().is_empty(), "window full");
    r.puback(1);
    r.pump();
    assert_eq!(r.wire.take(), ["c"]);
    // A full request queue is retried on the next turn, nothing skipped.
    r.wire.full = true;
    r.written(3, 1);
    r.puback(2);
    r.pump();
    r.wire.full = false;
    r.pump();
    assert_eq!(r.wire.take(), ["d"]);
}

#[test]
fn backoff_grows_while_connections_die_soon_after_connack_and_resets_once_one_held() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &[]);
    let mut waits = Vec::new();
    for _ in 0..6 {
        r.connack();
        r.reset(Duration::from_millis(300)); // the B2-16 storm: dies right after CONNACK
        waits.push(r.wait_retry().as_millis() as u64);
    }
    // Ceilings 500, 1000, … : the last waits are far above the first (jitter aside).
    assert!(waits[5] > 2000 && waits.iter().all(|w| *w >= 250), "{waits:?}");
    assert!(r.session.stats().last_error.unwrap().contains("nothing unacknowledged"));
    // A connection that holds resets it.
    r.connack();
    r.now += STABLE;
    r.pump();
    r.reset(Duration::from_millis(1));
    assert!(r.wait_retry() <= Duration::from_millis(500));
}

#[test]
fn subscriptions_are_renewed_on_every_connack() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &[]);
    r.connack();
    r.reset(Duration::from_secs(11));
    r.wait_retry();
    r.connack();
    assert_eq!(r.wire.subscribed, ["t/n/cmd", "homeassistant/status", "t/n/cmd", "homeassistant/status"]);
    let cmd = |topic: &str, payload: &[u8]| rumqttc::Event::Incoming(Packet::Publish(Publish::new(topic, QoS::AtLeastOnce, payload.to_vec())));
    assert_eq!(r.v4(cmd("t/n/cmd", b" pause\n")), Some(Inbound::Command("pause".into())));
    assert_eq!(r.v4(cmd("homeassistant/status", b"online")), Some(Inbound::HomeAssistantOnline));
    assert_eq!(r.v4(cmd("homeassistant/status", b"offline")), None);
    // A blob on the command topic (B2-16) is dropped, counted, and the link stays up.
    assert_eq!(r.v4(cmd("t/n/cmd", &[b'x'; MAX_COMMAND_BYTES + 1])), None);
    assert!(r.session.connected());
    assert_eq!(r.session.stats().incoming_dropped, 1);
}

#[test]
fn qos0_captions_leave_the_spool_once_written() {
    let mut r = Rig::new(QoS::AtMostOnce, 10, &["a", "b"]);
    r.connack();
    r.pump();
    assert!(r.wire.published.iter().all(|p| p.1 == QoS::AtMostOnce));
    r.written(0, 1);
    assert_eq!(r.left(), ["b"]);
    r.v4(rumqttc::Event::Outgoing(Outgoing::Publish(0)));
    assert!(r.left().is_empty());
}

#[test]
fn offline_is_acknowledged_and_other_messages_go_at_qos1() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &["a"]);
    r.session.queue("t/n/status", true, b"online".to_vec());
    r.connack();
    r.session.queue("t/n/status", true, b"online".to_vec());
    r.session.queue("t/n/stats", false, b"{}".to_vec());
    r.session.queue("t/n/stats", false, b"{\"n\":2}".to_vec()); // replaces the one queued
    r.pump();
    let sent: Vec<(String, QoS, bool)> = r.wire.published.iter().map(|p| (p.0.clone(), p.1, p.2)).collect();
    assert_eq!(
        sent,
        [("t/n/status".into(), QoS::AtLeastOnce, true), ("t/n/stats".into(), QoS::AtLeastOnce, false), ("t/n/caption".into(), QoS::AtLeastOnce, false)]
    );
    assert_eq!(r.wire.published[1].3, b"{\"n\":2}");
    r.written(1, 3);
    r.session.queue_offline("t/n/status");
    r.pump();
    r.written(4, 1);
    assert!(!r.session.offline_acked());
    r.puback(4);
    assert!(r.session.offline_acked());
}

#[test]
fn a_caption_the_broker_keeps_hanging_up_on_is_dead_lettered_and_the_rest_flow() {
    // B2-19: the broker closes the connection after a caption over its packet size limit.
    let big = "B".repeat(600);
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &["a", &big, "c", "d"]);
    r.connack();
    r.pump();
    r.written(1, 4);
    r.puback(1); // "a" got through before the big one
    r.reset(Duration::from_millis(50));
    assert!(r.session.careful(), "suspects in flight: one at a time from now on");
    let mut connections = 1;
    while dead_letters(r.spool.dir()) == 0 {
        assert!(connections < 10, "never set aside");
        r.wait_retry();
        r.connack();
        connections += 1;
        r.wire.take();
        r.pump();
        assert_eq!(r.wire.take(), std::slice::from_ref(&big), "careful: only the oldest is in flight");
        r.written(1, 1);
        r.reset(Duration::from_millis(30));
    }
    assert_eq!(connections, 3, "set aside after dead_letter_after (3) hang-ups");
    assert_eq!(r.spool.counts().dead_lettered, 1);
    assert_eq!(r.left(), ["c", "d"]);
    // Next connection: the rest flow, one at a time until it holds, then the window again.
    r.wait_retry();
    r.connack();
    r.wire.take();
    r.pump();
    assert_eq!(r.wire.take(), ["c"]);
    r.written(1, 1);
    r.puback(1);
    r.now += STABLE;
    r.pump();
    assert!(!r.session.careful());
    assert_eq!(r.wire.take(), ["d"]);
    // The broker's limit is learned: as large a caption is set aside without being sent.
    r.spool.append(big.clone().into_bytes());
    r.spool.append(b"e".to_vec());
    r.pump();
    assert_eq!(r.wire.take(), ["e"]);
    assert_eq!(r.spool.counts().dead_lettered, 2);
    assert_eq!(r.session.stats().oversize_dropped, 2, "both count as over the broker's limit");
}

#[test]
fn an_innocent_caption_is_not_dead_lettered_for_a_neighbour() {
    // Three in flight when the broker hangs up, their PUBACKs lost: all three are suspects
    // once; careful mode then sends one at a time, the good ones are acknowledged (their
    // strikes cleared) and only the big one reaches dead_letter_after.
    let big = "B".repeat(600);
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &["a", "b", &big]);
    r.connack();
    r.pump();
    assert_eq!(r.wire.take().len(), 3);
    r.written(1, 3);
    r.reset(Duration::from_millis(20));
    r.wait_retry();
    r.connack();
    r.wire.take();
    for (pkid, want) in [(1, "a"), (2, "b")] {
        r.pump();
        assert_eq!(r.wire.take(), [want]);
        r.written(pkid, 1);
        r.puback(pkid);
    }
    r.pump();
    assert_eq!(r.wire.take(), std::slice::from_ref(&big));
    r.written(3, 1);
    r.reset(Duration::from_millis(20));
    assert_eq!(r.spool.counts().dead_lettered, 0, "two hang-ups so far");
    r.wait_retry();
    r.connack();
    r.wire.take();
    r.pump();
    r.written(1, 1);
    r.reset(Duration::from_millis(20));
    assert!(r.left().is_empty(), "{:?}", r.left());
    assert_eq!(r.spool.counts().dead_lettered, 1, "only the big one");
}

#[test]
fn oversize_captions_are_set_aside_not_deleted() {
    let big = "x".repeat(1001);
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &[&big, "ok"]);
    r.connack();
    r.pump();
    assert_eq!(r.wire.captions(), ["ok"]);
    assert_eq!(r.session.stats().oversize_dropped, 1);
    assert_eq!(dead_letters(r.spool.dir()), 1);
}

#[test]
fn the_brokers_mqtt5_limit_is_checked_before_sending() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &["small", &"y".repeat(200)]);
    r.session.connecting();
    r.feed(Event::ConnAck { max_packet: Some(100) });
    r.pump();
    assert_eq!(r.wire.captions(), ["small"]);
    assert_eq!(r.session.stats().oversize_dropped, 1);
}

#[test]
fn mqtt5_refusals_and_limits_come_from_the_broker() {
    use rumqttc::v5::mqttbytes::v5 as p5;
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &["a", &"y".repeat(300), "c"]);
    r.session.connecting();
    let props = p5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: Some(200),
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    let connack = rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(p5::ConnAck { session_present: false, code: p5::ConnectReturnCode::Success, properties: Some(props) }));
    r.feed(from_v5(connack).unwrap());
    r.pump();
    assert_eq!(r.wire.take(), ["a", "c"], "the 300-byte one is over the advertised 200");
    r.written(1, 2);
    let puback = |pkid, reason| rumqttc::v5::Event::Incoming(p5::Packet::PubAck(p5::PubAck { pkid, reason, properties: None }));
    r.feed(from_v5(puback(1, p5::PubAckReason::NotAuthorized)).unwrap());
    r.feed(from_v5(puback(2, p5::PubAckReason::NoMatchingSubscribers)).unwrap());
    assert!(r.left().is_empty());
    assert_eq!(r.spool.counts().dead_lettered, 2, "the refused one and the oversized one are kept aside");
    assert_eq!(r.session.stats().oversize_dropped, 1);
    assert!(r.session.connected(), "no reconnect needed");
}

#[test]
fn a_broker_that_keeps_sending_an_oversized_packet_gets_the_command_topic_unsubscribed() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &[]);
    for _ in 0..2 {
        r.connack();
        r.now += Duration::from_millis(100);
        let e = ConnectionError::MqttState(rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(2_000_000)));
        let cause = describe(&e, &settings(QoS::AtLeastOnce, 1).endpoint, true);
        assert_eq!(cause.kind, CauseKind::IncomingTooLarge(2_000_000));
        r.feed(Event::Lost(cause));
        r.wait_retry();
    }
    assert_eq!(r.wire.unsubscribed, ["t/n/cmd"]);
    r.wire.subscribed.clear();
    r.connack();
    assert_eq!(r.wire.subscribed, ["homeassistant/status"], "commands stay off for this run");
}

#[test]
fn permanent_failures_wait_the_longest() {
    let mut r = Rig::new(QoS::AtLeastOnce, 10, &[]);
    r.session.connecting();
    r.feed(Event::Lost(Cause::new(CauseKind::Permanent, "mqtt: broker h:1883 refused the login")));
    assert_eq!(r.wait_retry(), Duration::from_secs(30));
    assert!(r.session.stats().last_error.unwrap().contains("refused the login"));
}
