//! An in-process MQTT broker (rumqttd, cargo feature `broker`) for a robot with no broker of
//! its own: `[broker] enabled = true` and point `[mqtt]` at its address.

use std::sync::Arc;

use super::config::BrokerSection;
use super::Control;
use crate::error::{Error, Result};

/// Starts the broker on its own threads; returns once it is listening. If it stops later,
/// the daemon stops too (non-zero exit: systemd restarts both).
///
/// Errors: [`Error::Setting`] for a bad address, [`Error::Thread`] when it does not start.
#[cfg(feature = "broker")]
pub fn start(cfg: &BrokerSection, control: &Arc<Control>) -> Result<()> {
    use std::collections::HashMap;
    let listen: std::net::SocketAddr = cfg.listen.parse().map_err(|e| Error::setting("broker.listen", format!("`{}`: {e}", cfg.listen)))?;
    let server = rumqttd::ServerSettings {
        name: "v4-1".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: cfg.max_payload_bytes,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    super::spawn("broker", control, move || {
        let mut b = rumqttd::Broker::new(config);
        b.start().map_err(|e| Error::thread("broker", format!("the in-process broker stopped: {e}")))
    })?;
    // Listening is asynchronous: wait (briefly) until it accepts connections.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(listen).is_err() {
        if std::time::Instant::now() > end {
            return Err(Error::thread("broker", format!("not listening on {listen} after 5 s (is the port taken?)")));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::info!(%listen, "in-process MQTT broker started");
    Ok(())
}

#[cfg(not(feature = "broker"))]
pub fn start(_cfg: &BrokerSection, _control: &Arc<Control>) -> Result<()> {
    Err(Error::setting("broker.enabled", "true, but this build has no broker: rebuild with `--features broker`"))
}
