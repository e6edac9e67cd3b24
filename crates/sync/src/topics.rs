//! MQTT topic names.
//!
//! This module exists so that the topic layout, which the broker's access control depends on, is
//! written in one place as pure string functions. Each device may publish only to its own `up`
//! topic and subscribe only to its own `down` topic and its account's broadcast topic; the cloud
//! learns the sender of a message from the topic alone.

use crate::identity::{DeviceId, BROADCAST_DEVICE, PROBE_ACCOUNT};

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "devtables";

/// Device → cloud: `{prefix}/{account}/{device}/up`.
pub fn up_topic(prefix: &str, id: &DeviceId) -> String {
    format!("{prefix}/{}/{}/up", id.account, id.device)
}

/// Cloud → device: `{prefix}/{account}/{device}/down`.
pub fn down_topic(prefix: &str, id: &DeviceId) -> String {
    format!("{prefix}/{}/{}/down", id.account, id.device)
}

/// Cloud → every device of an account: `{prefix}/{account}/_all/down`.
///
/// Reserved for account-wide notices. Broadcast items themselves travel in each device's own feed
/// so that each device has a cursor and catches up after being offline.
pub fn broadcast_topic(prefix: &str, account: &str) -> String {
    format!("{prefix}/{account}/{BROADCAST_DEVICE}/down")
}

/// The subscription filter the cloud uses to receive every device's messages.
pub fn up_filter(prefix: &str) -> String {
    format!("{prefix}/+/+/up")
}

/// The cloud's path probe of node `node`: `{prefix}/_devtables/{node}/up`. It matches the
/// cloud's up filter, so a probe the cloud publishes comes back through the very subscription
/// that carries the devices' messages; the account is reserved ([`PROBE_ACCOUNT`]), so no device
/// may publish there.
pub fn probe_topic(prefix: &str, node: &str) -> String {
    format!("{prefix}/{PROBE_ACCOUNT}/{node}/up")
}

/// The node whose probe `topic` is, if it is a probe topic under `prefix`.
pub fn parse_probe_topic<'t>(prefix: &str, topic: &'t str) -> Option<&'t str> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let node = rest
        .strip_prefix(PROBE_ACCOUNT)?
        .strip_prefix('/')?
        .strip_suffix("/up")?;
    (!node.is_empty() && !node.contains('/')).then_some(node)
}

/// The device that published on `topic`, if it is a valid up topic under `prefix`.
pub fn parse_up_topic(prefix: &str, topic: &str) -> Option<DeviceId> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let account = parts.next()?;
    let device = parts.next()?;
    if parts.next()? != "up" || parts.next().is_some() {
        return None;
    }
    DeviceId::new(account, device).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_topics_are_told_from_device_topics() {
        let t = probe_topic("p", "node-1");
        assert_eq!(t, "p/_devtables/node-1/up");
        assert_eq!(parse_probe_topic("p", &t), Some("node-1"));
        assert_eq!(
            parse_up_topic("p", &t),
            None,
            "no device may speak as a probe"
        );
        for not_a_probe in [
            "p/acme/d1/up",
            "p/_devtables//up",
            "p/_devtables/a/b/up",
            "q/_devtables/node-1/up",
            "p/_devtables/node-1/down",
        ] {
            assert_eq!(parse_probe_topic("p", not_a_probe), None, "{not_a_probe}");
        }
    }

    #[test]
    fn round_trip_and_rejects() {
        let id = DeviceId::new("acme", "d1").unwrap();
        let t = up_topic(DEFAULT_PREFIX, &id);
        assert_eq!(t, "devtables/acme/d1/up");
        assert_eq!(parse_up_topic(DEFAULT_PREFIX, &t), Some(id.clone()));
        assert_eq!(down_topic("p", &id), "p/acme/d1/down");
        assert_eq!(broadcast_topic("p", "acme"), "p/acme/_all/down");
        for bad in [
            "devtables/acme/d1/down",
            "devtables/acme/_all/up",
            "devtables/acme/d1/up/x",
            "devtablesx/acme/d1/up",
            "other/acme/d1/up",
            "devtables/acme/up",
            "devtables//d1/up",
        ] {
            assert_eq!(parse_up_topic(DEFAULT_PREFIX, bad), None, "{bad}");
        }
    }
}
