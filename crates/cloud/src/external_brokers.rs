//! The addresses of an external broker cluster, and moving one of the service's MQTT connections
//! among them.
//!
//! This module exists because one broker is one point of failure: an external broker may be a
//! cluster (several nodes that share sessions and subscriptions), and the service must reach it
//! through whichever node is up. Every failed attempt and every lost connection moves that
//! connection's next attempt to the next address, round the list ([`ExternalBrokers::advance`]),
//! after the usual backoff wait of `mqtt_link`. The sessions stay clean on every node: what was
//! in flight when a node died is recovered by the protocol (the sync loop restarts every device
//! session once both connections are back), not by the broker.
//!
//! rumqttc keeps the address inside its `MqttOptions` and has no setter for it, so moving means
//! building the same options for the other address ([`readdressed`]) and swapping them into the
//! event loop between two attempts.

use rumqttc::{EventLoop, MqttOptions};

/// The addresses one connection goes round, and the one its next attempt uses.
#[derive(Debug)]
pub(crate) struct ExternalBrokers {
    addresses: Vec<(String, u16)>,
    current: usize,
}

impl ExternalBrokers {
    /// The event loop's own address first, then `fallbacks` (the others of the cluster; the
    /// first address is skipped if listed there again).
    pub(crate) fn new(eventloop: &EventLoop, fallbacks: &[(String, u16)]) -> ExternalBrokers {
        let first = eventloop.mqtt_options.broker_address();
        let mut addresses = vec![first];
        for address in fallbacks {
            if !addresses.contains(address) {
                addresses.push(address.clone());
            }
        }
        ExternalBrokers {
            addresses,
            current: 0,
        }
    }

    /// `host:port` of the current connection, or of the next attempt.
    pub(crate) fn current(&self) -> String {
        let (host, port) = &self.addresses[self.current];
        format!("{host}:{port}")
    }

    /// Points `eventloop` at the next address, round the list; returns it (`host:port`) when it
    /// is another one (never with a single address).
    pub(crate) fn advance(&mut self, eventloop: &mut EventLoop) -> Option<String> {
        if self.addresses.len() < 2 {
            return None;
        }
        self.current = (self.current + 1) % self.addresses.len();
        let (host, port) = &self.addresses[self.current];
        eventloop.mqtt_options = readdressed(&eventloop.mqtt_options, host, *port);
        Some(self.current())
    }
}

/// `options` with another broker address: every setting the service makes (the client id,
/// keep-alive, clean session, credentials, packet sizes, in-flight window, request queue,
/// throttle, last will, acknowledgement mode and transport with its TLS settings) is carried
/// over. rumqttc reads only one packet size back, so the outgoing limit is set to the incoming
/// one, as the service sets both.
pub(crate) fn readdressed(options: &MqttOptions, host: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(options.client_id(), host, port);
    o.set_transport(options.transport());
    o.set_keep_alive(options.keep_alive());
    o.set_clean_session(options.clean_session());
    if let Some(login) = options.credentials() {
        o.set_credentials(login.username, login.password);
    }
    o.set_max_packet_size(options.max_packet_size(), options.max_packet_size());
    o.set_request_channel_capacity(options.request_channel_capacity());
    o.set_pending_throttle(options.pending_throttle());
    o.set_inflight(options.inflight());
    if let Some(will) = options.last_will() {
        o.set_last_will(will);
    }
    o.set_manual_acks(options.manual_acks());
    o
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rumqttc::{LastWill, QoS, Transport};

    use super::*;

    /// Options with every setting away from rumqttc's default.
    fn options(host: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new("devtables-cloud-7-in", host, port);
        o.set_keep_alive(Duration::from_secs(17));
        o.set_clean_session(false);
        o.set_credentials("devtables-service", "pw");
        o.set_max_packet_size(300_000, 300_000);
        o.set_request_channel_capacity(77);
        o.set_pending_throttle(Duration::from_millis(3));
        o.set_inflight(512);
        o.set_last_will(LastWill::new("t/x", "bye", QoS::AtLeastOnce, false));
        o.set_manual_acks(true);
        let tls = rustls::ClientConfig::builder_with_provider(devtables_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
        ));
        o
    }

    #[test]
    fn readdressing_keeps_every_setting_but_the_address() {
        let original = options("a", 1);
        let moved = readdressed(&original, "b", 2);
        assert_eq!(moved.broker_address(), ("b".to_string(), 2));
        assert!(matches!(moved.transport(), Transport::Tls(_)), "TLS kept");
        // rumqttc's Debug shows every other setting: back at the first address, the options
        // read exactly as the original.
        let back = readdressed(&moved, "a", 1);
        assert_eq!(format!("{back:?}"), format!("{original:?}"));
    }

    #[test]
    fn a_connection_goes_round_the_cluster() {
        let mut eventloop = EventLoop::new(options("a", 1), 8);
        let fallbacks = [
            ("b".to_string(), 2),
            ("a".to_string(), 1),
            ("c".to_string(), 3),
        ];
        let mut brokers = ExternalBrokers::new(&eventloop, &fallbacks);
        assert_eq!(brokers.current(), "a:1");
        for expected in ["b:2", "c:3", "a:1", "b:2"] {
            assert_eq!(brokers.advance(&mut eventloop).as_deref(), Some(expected));
            let (host, port) = eventloop.mqtt_options.broker_address();
            assert_eq!(
                format!("{host}:{port}"),
                expected,
                "the next attempt's address"
            );
        }
        let mut eventloop = EventLoop::new(options("a", 1), 8);
        let mut alone = ExternalBrokers::new(&eventloop, &[]);
        assert_eq!(alone.advance(&mut eventloop), None);
        assert_eq!(alone.current(), "a:1");
    }
}
