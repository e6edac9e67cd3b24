//! Who a device is and who owns an item.
//!
//! This module exists so that identity is validated once, at the edge, and every other module can
//! rely on it: a [`DeviceId`] always names a real device (never the broadcast name), and an
//! [`Owner`] says whose rows an item belongs to in the cloud.

/// The reserved device name of the account broadcast topic; no device may take it.
pub const BROADCAST_DEVICE: &str = "_all";

/// The reserved account of the cloud's own path probes
/// ([`crate::topics::probe_topic`]); no device may belong to it, so no device can publish a
/// probe or have its messages taken for one.
pub const PROBE_ACCOUNT: &str = "_devtables";

/// Longest account or device name, in characters.
pub const MAX_NAME_LEN: usize = 64;

/// A device, named by its account and its own name.
///
/// The cloud derives it from the MQTT topic only (the broker lets each client publish only under
/// its own prefix), never from a payload, so a device cannot speak for another.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId {
    /// The account (tenant) the device belongs to; broadcast items are shared within it.
    pub account: String,
    /// The device's name, unique within the account.
    pub device: String,
}

/// A device or account name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The name is empty or longer than [`MAX_NAME_LEN`].
    #[error("{what} name must be 1 to 64 characters long, got {len}")]
    Length {
        /// `account` or `device`.
        what: &'static str,
        /// The length given.
        len: usize,
    },
    /// The name holds a character outside `[A-Za-z0-9_.-]`.
    #[error("{what} name {name:?} may only contain A-Z, a-z, 0-9, '_', '.' and '-'")]
    Character {
        /// `account` or `device`.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// The device name is the reserved broadcast name.
    #[error("device name {BROADCAST_DEVICE:?} is reserved for account broadcasts: choose another")]
    Reserved,
    /// The account name is the one the cloud's path probes use.
    #[error(
        "account name {PROBE_ACCOUNT:?} is reserved for the cloud's own probes: choose another"
    )]
    ReservedAccount,
}

fn check_name(what: &'static str, name: &str) -> Result<(), IdError> {
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_LEN {
        return Err(IdError::Length { what, len });
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(IdError::Character {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

impl DeviceId {
    /// Validate and build a device id.
    pub fn new(account: impl Into<String>, device: impl Into<String>) -> Result<DeviceId, IdError> {
        let account = account.into();
        let device = device.into();
        check_name("account", &account)?;
        check_name("device", &device)?;
        if device == BROADCAST_DEVICE {
            return Err(IdError::Reserved);
        }
        if account == PROBE_ACCOUNT {
            return Err(IdError::ReservedAccount);
        }
        Ok(DeviceId { account, device })
    }

    /// The name this device's [`crate::hlc::HlcClock`] node id is derived from.
    pub fn node_name(&self) -> String {
        format!("{}/{}", self.account, self.device)
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.account, self.device)
    }
}

/// Whose rows an item belongs to in the cloud.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// Items of one device: written by it (up, both) or for it (down, both).
    Device(DeviceId),
    /// Items of a broadcast model: written in the cloud, delivered to every device of the account.
    Account(String),
}

impl Owner {
    /// The account the owner belongs to.
    pub fn account(&self) -> &str {
        match self {
            Owner::Device(d) => &d.account,
            Owner::Account(a) => a,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names() {
        assert!(DeviceId::new("acme", "dev-1.a_b").is_ok());
        assert_eq!(DeviceId::new("acme", "_all"), Err(IdError::Reserved));
        assert_eq!(
            DeviceId::new(PROBE_ACCOUNT, "d1"),
            Err(IdError::ReservedAccount)
        );
        assert!(matches!(
            DeviceId::new("", "d"),
            Err(IdError::Length { .. })
        ));
        assert!(matches!(
            DeviceId::new("a", "x".repeat(65)),
            Err(IdError::Length { .. })
        ));
        assert!(matches!(
            DeviceId::new("a", "d/e"),
            Err(IdError::Character { .. })
        ));
        assert!(matches!(
            DeviceId::new("a+", "d"),
            Err(IdError::Character { .. })
        ));
    }
}
