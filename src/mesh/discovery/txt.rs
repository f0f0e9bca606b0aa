//! The TXT record of an announcement, both ways: what this node puts in
//! its record, and what a received record says. Pure; every value has a
//! named limit, and anything outside them is an error that names the field.

use base64::Engine;
use thiserror::Error;

use super::{Announcement, PROTOCOL_VERSION, SERVICE_TYPE};
use crate::mesh::identity::MAX_NODE_NAME;

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One TXT string (`key=value`) is at most 255 bytes on the wire.
pub const MAX_TXT_ENTRY: usize = 255;
pub const MAX_MESH_ID: usize = 64;
/// Base64 of 32 bytes, with padding.
const KEY_B64_LEN: usize = 44;
const MAX_VERSION_DIGITS: usize = 10;
const MAX_PORT_DIGITS: usize = 5;
/// Hex characters of the key that make the instance name: 64 bits, unique
/// per node on any LAN.
const INSTANCE_HEX_CHARS: usize = 16;

const TXT_VERSION: &str = "v";
const TXT_KEY: &str = "key";
const TXT_PORT: &str = "port";
const TXT_MESH: &str = "mesh";
const TXT_NAME: &str = "name";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TxtError {
    #[error("TXT record has no `{0}`")]
    Missing(&'static str),
    #[error("TXT record has `{0}` more than once")]
    Duplicate(&'static str),
    #[error("TXT entry of {len} bytes, more than {MAX_TXT_ENTRY}")]
    EntryTooLong { len: usize },
    #[error("TXT `{key}` is {len} bytes, more than {max}")]
    TooLong {
        key: &'static str,
        len: usize,
        max: usize,
    },
    #[error("TXT `{TXT_VERSION}` is not a version number")]
    BadVersion,
    #[error("TXT `{TXT_KEY}` is not base64")]
    BadKeyBase64,
    #[error("TXT `{TXT_KEY}` has {0} bytes, expected 32")]
    KeyLength(usize),
    #[error("TXT `{TXT_PORT}` is not a port number (1-65535)")]
    BadPort,
    #[error("TXT `{TXT_MESH}` is empty or not printable ASCII")]
    BadMeshId,
    #[error("TXT `{TXT_NAME}` is empty or has control characters")]
    BadName,
    #[error("TXT `{0}` is not UTF-8")]
    NotUtf8(String),
}

/// Announcement -> TXT properties: `v`, `key` (standard base64 of the 32
/// bytes), `port`, `mesh`, `name`.
pub fn to_txt(a: &Announcement) -> Vec<(String, String)> {
    vec![
        (TXT_VERSION.to_string(), a.version.to_string()),
        (TXT_KEY.to_string(), BASE64.encode(a.key)),
        (TXT_PORT.to_string(), a.quic_port.to_string()),
        (TXT_MESH.to_string(), a.mesh_id.clone()),
        (TXT_NAME.to_string(), a.name.clone()),
    ]
}

/// TXT properties -> Announcement. Keys match case-insensitively (RFC 6763);
/// unknown keys are ignored; a missing, repeated, oversized or malformed
/// known value is an error. Any version number parses: whether it is
/// supported is the caller's decision.
pub fn parse_txt(props: &[(String, String)]) -> Result<Announcement, TxtError> {
    let mut version = None;
    let mut key = None;
    let mut port = None;
    let mut mesh = None;
    let mut name = None;
    for (k, v) in props {
        let len = k.len() + 1 + v.len();
        if len > MAX_TXT_ENTRY {
            return Err(TxtError::EntryTooLong { len });
        }
        let slot = match k.to_ascii_lowercase().as_str() {
            TXT_VERSION => (&mut version, TXT_VERSION),
            TXT_KEY => (&mut key, TXT_KEY),
            TXT_PORT => (&mut port, TXT_PORT),
            TXT_MESH => (&mut mesh, TXT_MESH),
            TXT_NAME => (&mut name, TXT_NAME),
            _ => continue,
        };
        if slot.0.replace(v.as_str()).is_some() {
            return Err(TxtError::Duplicate(slot.1));
        }
    }
    let version = version.ok_or(TxtError::Missing(TXT_VERSION))?;
    let key = key.ok_or(TxtError::Missing(TXT_KEY))?;
    let port = port.ok_or(TxtError::Missing(TXT_PORT))?;
    let mesh = mesh.ok_or(TxtError::Missing(TXT_MESH))?;
    let name = name.ok_or(TxtError::Missing(TXT_NAME))?;
    Ok(Announcement {
        version: parse_decimal(version, MAX_VERSION_DIGITS).ok_or(TxtError::BadVersion)?,
        key: parse_key(key)?,
        quic_port: parse_decimal(port, MAX_PORT_DIGITS)
            .filter(|&p| p != 0)
            .ok_or(TxtError::BadPort)?,
        mesh_id: parse_mesh_id(mesh)?,
        name: parse_name(name)?,
    })
}

/// Plain decimal digits only: `from_str` alone would take `+80`.
fn parse_decimal<T: std::str::FromStr>(text: &str, max_digits: usize) -> Option<T> {
    if text.is_empty() || text.len() > max_digits || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_key(text: &str) -> Result<[u8; 32], TxtError> {
    if text.len() > KEY_B64_LEN {
        return Err(TxtError::TooLong {
            key: TXT_KEY,
            len: text.len(),
            max: KEY_B64_LEN,
        });
    }
    let bytes = BASE64.decode(text).map_err(|_| TxtError::BadKeyBase64)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| TxtError::KeyLength(len))
}

fn parse_mesh_id(text: &str) -> Result<String, TxtError> {
    if text.len() > MAX_MESH_ID {
        return Err(TxtError::TooLong {
            key: TXT_MESH,
            len: text.len(),
            max: MAX_MESH_ID,
        });
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TxtError::BadMeshId);
    }
    Ok(text.to_string())
}

/// The name is shown in `nixmesh peers` and logs: no control characters,
/// so a record cannot rewrite the operator's terminal.
fn parse_name(text: &str) -> Result<String, TxtError> {
    if text.len() > MAX_NODE_NAME {
        return Err(TxtError::TooLong {
            key: TXT_NAME,
            len: text.len(),
            max: MAX_NODE_NAME,
        });
    }
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(TxtError::BadName);
    }
    Ok(text.to_string())
}

/// The mDNS instance name of the node with `key`: unique per node.
pub fn instance_name(key: &[u8; 32]) -> String {
    crate::nix::base16::encode(&key[..INSTANCE_HEX_CHARS / 2])
}

pub(super) fn instance_fullname(key: &[u8; 32]) -> String {
    format!("{}.{SERVICE_TYPE}", instance_name(key))
}

pub(super) fn is_supported(version: u32) -> bool {
    version == PROTOCOL_VERSION
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn announcement(key_byte: u8) -> Announcement {
        Announcement {
            version: PROTOCOL_VERSION,
            key: [key_byte; 32],
            quic_port: 7443,
            mesh_id: "0123abcd".to_string(),
            name: "build-7".to_string(),
        }
    }

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(crate) fn with(a: &Announcement, key: &str, value: &str) -> Vec<(String, String)> {
        let mut txt = to_txt(a);
        for (k, v) in &mut txt {
            if k == key {
                *v = value.to_string();
            }
        }
        txt
    }

    fn without(a: &Announcement, key: &str) -> Vec<(String, String)> {
        to_txt(a).into_iter().filter(|(k, _)| k != key).collect()
    }

    #[test]
    fn txt_round_trips_and_reads_as_documented() {
        let a = announcement(7);
        let txt = to_txt(&a);
        assert_eq!(
            txt,
            props(&[
                ("v", "1"),
                ("key", "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="),
                ("port", "7443"),
                ("mesh", "0123abcd"),
                ("name", "build-7"),
            ])
        );
        assert_eq!(parse_txt(&txt), Ok(a));
    }

    #[test]
    fn unknown_keys_are_ignored_and_known_ones_match_any_case() {
        let a = announcement(1);
        let mut txt: Vec<_> = to_txt(&a)
            .into_iter()
            .map(|(k, v)| (k.to_uppercase(), v))
            .collect();
        txt.push(("future".into(), "whatever".into()));
        txt.insert(0, ("x".into(), String::new()));
        assert_eq!(parse_txt(&txt), Ok(a));
    }

    #[test]
    fn every_missing_field_is_named() {
        let a = announcement(1);
        for key in ["v", "key", "port", "mesh", "name"] {
            assert_eq!(
                parse_txt(&without(&a, key)),
                Err(TxtError::Missing(match key {
                    "v" => TXT_VERSION,
                    "key" => TXT_KEY,
                    "port" => TXT_PORT,
                    "mesh" => TXT_MESH,
                    _ => TXT_NAME,
                }))
            );
        }
    }

    #[test]
    fn bad_keys_are_rejected() {
        let a = announcement(1);
        let short = BASE64.encode([1u8; 31]);
        let long = BASE64.encode([1u8; 33]);
        assert_eq!(
            parse_txt(&with(&a, "key", &short)),
            Err(TxtError::KeyLength(31))
        );
        assert_eq!(
            parse_txt(&with(&a, "key", &long)),
            Err(TxtError::KeyLength(33))
        );
        assert!(matches!(
            parse_txt(&with(&a, "key", &BASE64.encode([1u8; 34]))),
            Err(TxtError::TooLong { key: "key", .. })
        ));
        assert_eq!(
            parse_txt(&with(
                &a,
                "key",
                "not base64 at all, not at all!!!!!!!!!!!!!!"
            )),
            Err(TxtError::BadKeyBase64)
        );
        // Unpadded and URL-safe spellings are not what `to_txt` writes.
        let unpadded = BASE64
            .encode([0xfbu8; 32])
            .trim_end_matches('=')
            .to_string();
        assert_eq!(
            parse_txt(&with(&a, "key", &unpadded)),
            Err(TxtError::BadKeyBase64)
        );
        let url_safe = BASE64
            .encode([0xfbu8; 32])
            .replace('+', "-")
            .replace('/', "_");
        assert_eq!(
            parse_txt(&with(&a, "key", &url_safe)),
            Err(TxtError::BadKeyBase64)
        );
        assert_eq!(parse_txt(&with(&a, "key", "")), Err(TxtError::KeyLength(0)));
    }

    #[test]
    fn huge_values_are_rejected() {
        let a = announcement(1);
        let huge = "a".repeat(300);
        for key in ["v", "key", "port", "mesh", "name", "unknown"] {
            let mut txt = to_txt(&a);
            txt.push((key.to_string(), huge.clone()));
            txt.retain(|(k, v)| k != key || v == &huge);
            assert_eq!(
                parse_txt(&txt),
                Err(TxtError::EntryTooLong {
                    len: key.len() + 301
                }),
                "{key}"
            );
        }
        let huge_key = "k".repeat(300);
        let mut txt = to_txt(&a);
        txt.push((huge_key, String::new()));
        assert!(matches!(
            parse_txt(&txt),
            Err(TxtError::EntryTooLong { .. })
        ));
        // Below the TXT limit, each field has its own.
        assert!(matches!(
            parse_txt(&with(&a, "name", &"n".repeat(MAX_NODE_NAME + 1))),
            Err(TxtError::TooLong { key: "name", .. })
        ));
        assert!(matches!(
            parse_txt(&with(&a, "mesh", &"m".repeat(MAX_MESH_ID + 1))),
            Err(TxtError::TooLong { key: "mesh", .. })
        ));
        assert_eq!(
            parse_txt(&with(&a, "v", "12345678901")),
            Err(TxtError::BadVersion)
        );
    }

    #[test]
    fn bad_ports_are_rejected() {
        let a = announcement(1);
        for port in [
            "0",
            "65536",
            "-1",
            "+80",
            " 80",
            "80 ",
            "0x50",
            "",
            "99999999999",
        ] {
            assert_eq!(
                parse_txt(&with(&a, "port", port)),
                Err(TxtError::BadPort),
                "{port:?}"
            );
        }
        assert_eq!(
            parse_txt(&with(&a, "port", "65535")).unwrap().quic_port,
            65535
        );
        assert_eq!(parse_txt(&with(&a, "port", "00080")).unwrap().quic_port, 80);
    }

    #[test]
    fn versions_must_be_numbers() {
        let a = announcement(1);
        for v in ["one", "", "1.0", "-1", "+1", "4294967296"] {
            assert_eq!(
                parse_txt(&with(&a, "v", v)),
                Err(TxtError::BadVersion),
                "{v:?}"
            );
        }
        // Any number parses; support is decided by the caller.
        assert_eq!(parse_txt(&with(&a, "v", "2")).unwrap().version, 2);
    }

    #[test]
    fn mesh_ids_and_names_are_printable() {
        let a = announcement(1);
        for mesh in ["", "open mesh", "tab\t", "é"] {
            assert_eq!(
                parse_txt(&with(&a, "mesh", mesh)),
                Err(TxtError::BadMeshId),
                "{mesh:?}"
            );
        }
        for name in ["", "evil\x1b[2J", "new\nline"] {
            assert_eq!(
                parse_txt(&with(&a, "name", name)),
                Err(TxtError::BadName),
                "{name:?}"
            );
        }
        assert_eq!(
            parse_txt(&with(&a, "mesh", "open")).unwrap().mesh_id,
            "open"
        );
        assert_eq!(
            parse_txt(&with(&a, "name", "Büro PC 3")).unwrap().name,
            "Büro PC 3"
        );
    }

    #[test]
    fn repeated_fields_are_rejected() {
        let a = announcement(1);
        let mut txt = to_txt(&a);
        txt.push(("PORT".into(), "7443".into()));
        assert_eq!(parse_txt(&txt), Err(TxtError::Duplicate(TXT_PORT)));
    }

    #[test]
    fn instance_names_come_from_the_key() {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 0xff]);
        assert_eq!(instance_name(&key), "deadbeef000102ff");
        assert_eq!(
            instance_fullname(&key),
            "deadbeef000102ff._nixmesh._udp.local."
        );
    }

    fn valid_announcement() -> impl Strategy<Value = Announcement> {
        (
            any::<u32>(),
            any::<[u8; 32]>(),
            1..=u16::MAX,
            "[!-~]{1,64}",
            "[^\\p{Cc}]{1,15}",
        )
            .prop_map(|(version, key, quic_port, mesh_id, name)| Announcement {
                version,
                key,
                quic_port,
                mesh_id,
                name,
            })
            .prop_filter("name fits", |a| a.name.len() <= MAX_NODE_NAME)
    }

    proptest! {
        #[test]
        fn valid_announcements_round_trip(a in valid_announcement()) {
            prop_assert_eq!(parse_txt(&to_txt(&a)), Ok(a));
        }

        #[test]
        fn parse_txt_never_panics(
            props in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("v".to_string()),
                        Just("key".to_string()),
                        Just("port".to_string()),
                        Just("mesh".to_string()),
                        Just("name".to_string()),
                        ".{0,300}",
                    ],
                    ".{0,300}",
                ),
                0..8,
            )
        ) {
            let _ = parse_txt(&props);
        }

        #[test]
        fn one_field_changed_at_random_never_panics(
            field in 0usize..5,
            value in ".{0,300}",
        ) {
            let a = announcement(3);
            let mut txt = to_txt(&a);
            txt[field].1 = value;
            if let Ok(b) = parse_txt(&txt) {
                prop_assert_eq!(parse_txt(&to_txt(&b)), Ok(b));
            }
        }
    }
}
