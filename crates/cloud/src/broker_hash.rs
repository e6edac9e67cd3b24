//! A second, broker-readable hash of each device secret: the form Mosquitto's `password_file`
//! holds (`$7$`, PBKDF2-HMAC-SHA512, as `mosquitto_passwd` writes it).
//!
//! It exists because the registry stores secrets only as `sha256:<hex>` (see [`crate::auth`]),
//! which Mosquitto cannot check, and the secret itself is never stored: so the cloud computes
//! this hash at the only moments the secret exists, registration and rotation, and keeps it
//! beside the other one. `devtables broker-config mosquitto` then writes Mosquitto's password
//! file from the registry alone. Revocation removes it.
//!
//! The format, as Mosquitto 2.0 reads it: `$7$<iterations>$<base64 salt>$<base64 hash>`, with a
//! 12-byte salt, 101 iterations (`mosquitto_passwd`'s default) and a 64-byte SHA-512 output,
//! both in standard base64 with padding. A slow hash adds nothing for a 256-bit random secret,
//! but it is the format Mosquitto understands.

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;

/// The iterations `mosquitto_passwd` uses (Mosquitto 2.0's `PW_DEFAULT_ITERATIONS`).
pub const MOSQUITTO_ITERATIONS: u32 = 101;
/// Salt length `mosquitto_passwd` uses, in bytes.
const SALT_LEN: usize = 12;
/// PBKDF2-HMAC-SHA512 output length, in bytes.
const HASH_LEN: usize = 64;

/// Mosquitto's password-file hash of `secret`, with a fresh random salt.
pub fn mosquitto_hash(secret: &str) -> String {
    let mut salt = [0u8; SALT_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    mosquitto_hash_with(secret, &salt, MOSQUITTO_ITERATIONS)
}

/// Mosquitto's password-file hash of `secret` with the given salt and iteration count (0 counts
/// as 1). Deterministic: for checking against hashes `mosquitto_passwd` wrote.
pub fn mosquitto_hash_with(secret: &str, salt: &[u8], iterations: u32) -> String {
    let rounds = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    let mut out = [0u8; HASH_LEN];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        rounds,
        salt,
        secret.as_bytes(),
        &mut out,
    );
    format!(
        "$7${}${}${}",
        rounds,
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

/// Whether `text` has the shape of a `$7$` hash this module writes (it is written into a line
/// of Mosquitto's password file, so nothing else may get there: no `:`, no line break).
pub fn is_mosquitto_hash(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("$7$") else {
        return false;
    };
    let mut parts = rest.split('$');
    let (Some(iterations), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    iterations.parse::<NonZeroU32>().is_ok()
        && STANDARD.decode(salt).is_ok_and(|s| !s.is_empty())
        && STANDARD.decode(hash).is_ok_and(|h| h.len() == HASH_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (iterations, salt, hash) of a `$7$` hash.
    fn parts(hash: &str) -> (u32, Vec<u8>, Vec<u8>) {
        let rest = hash.strip_prefix("$7$").expect("a $7$ hash");
        let mut p = rest.split('$');
        let iterations = p.next().unwrap().parse().unwrap();
        let salt = STANDARD.decode(p.next().unwrap()).unwrap();
        let out = STANDARD.decode(p.next().unwrap()).unwrap();
        (iterations, salt, out)
    }

    /// A line `mosquitto_passwd -c -b FILE acme/d1 secret1` (Mosquitto 2.0.11) wrote.
    const WRITTEN_BY_MOSQUITTO_PASSWD: &str = "$7$101$ngdFB1E4N/m9DxfU$MSn8OdX3NynUWf5G4X16vfgHLJ49gfQlOrJUteu0PsplfcoUnNZHfz7tgQyTYkz4eWWU6OSwBlqqmKo473v+hA==";

    #[test]
    fn the_encoder_reproduces_a_hash_mosquitto_passwd_wrote() {
        let (iterations, salt, _) = parts(WRITTEN_BY_MOSQUITTO_PASSWD);
        assert_eq!(
            mosquitto_hash_with("secret1", &salt, iterations),
            WRITTEN_BY_MOSQUITTO_PASSWD
        );
        assert_ne!(
            mosquitto_hash_with("secret2", &salt, iterations),
            WRITTEN_BY_MOSQUITTO_PASSWD
        );
    }

    #[test]
    fn fresh_hashes_have_mosquittos_shape_and_a_new_salt_each_time() {
        let a = mosquitto_hash("s");
        let b = mosquitto_hash("s");
        assert_ne!(a, b, "a fresh salt each time");
        for h in [&a, &b] {
            assert!(is_mosquitto_hash(h), "{h}");
            let (iterations, salt, out) = parts(h);
            assert_eq!(
                (iterations, salt.len(), out.len()),
                (101, SALT_LEN, HASH_LEN)
            );
            assert_eq!(&mosquitto_hash_with("s", &salt, iterations), h);
        }
        for bad in [
            "",
            "sha256:00",
            "$6$101$c2FsdA==$aGFzaA==",
            "$7$0$c2FsdA==$aGFzaA==",
            "$7$101$c2FsdA==",
            "$7$101$c2FsdA==$aGFzaA==",
            &format!("{a}$x"),
            &format!("{a}\nother:line"),
            &a.replace('$', ":"),
        ] {
            assert!(!is_mosquitto_hash(bad), "{bad:?}");
        }
    }

    /// Against the `mosquitto_passwd` on this machine (Debian package `mosquitto`), with a salt
    /// it chose: our encoder gives the same hash for the same secret. Skipped (with a line
    /// saying so) when the tool is missing, unless DEVTABLES_SERVICES is set.
    #[test]
    fn the_encoder_agrees_with_the_installed_mosquitto_passwd() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwords");
        let secret = crate::auth::generate_secret();
        let run = std::process::Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&file)
            .args(["acme/d1", &secret])
            .output();
        let out = match run {
            Ok(out) => out,
            Err(e) if std::env::var_os("DEVTABLES_SERVICES").is_none() => {
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED broker_hash::the_encoder_agrees_with_the_installed_mosquitto_passwd: \
                     mosquitto_passwd cannot run ({e})"
                );
                return;
            }
            Err(e) => panic!("DEVTABLES_SERVICES is set but mosquitto_passwd cannot run: {e}"),
        };
        assert!(out.status.success(), "{out:?}");
        let text = std::fs::read_to_string(&file).unwrap();
        let line = text.lines().next().expect("one line");
        let theirs = line.strip_prefix("acme/d1:").expect("user:hash");
        assert!(is_mosquitto_hash(theirs), "{theirs}");
        let (iterations, salt, _) = parts(theirs);
        assert_eq!(mosquitto_hash_with(&secret, &salt, iterations), theirs);
    }
}
