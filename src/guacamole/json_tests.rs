//! The sealing checked two ways: the known answer from the spec, and the real `openssl` CLI
//! (the extension's own reference implementation, `encrypt-json.sh`, is built on it) opening
//! and re-sealing tokens this code issued.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use secrecy::SecretString;

use super::json_auth::{Connection, JsonAuth, JsonSecretKey, link_for, seal, sign};
use super::{Guacamole, GuacamoleConfig, VncTarget};

const KEY_HEX: &str = "4c0b569e4c96df157eee1b65dd0e4d41";
const KNOWN_JSON: &str = r#"{"username":"test","expires":1446323765000,"connections":{"My Connection":{"protocol":"vnc","parameters":{"hostname":"10.0.0.5","port":"5900"}}}}"#;
const KNOWN_HMAC: &str = "f5b43f5c86770dfe075907642eb9438c14bd0d5086d793b5a3a24d1f3a6bb29d";

fn known_payload() -> JsonAuth {
    let params = BTreeMap::from([("hostname".to_string(), "10.0.0.5".to_string()), ("port".to_string(), "5900".to_string())]);
    JsonAuth {
        username: "test".into(),
        expires_ms: 1446323765000,
        single_use: false,
        connections: BTreeMap::from([("My Connection".to_string(), Connection::new("vnc", params))]),
    }
}

#[test]
fn known_answer_from_the_spec() {
    let key = JsonSecretKey::parse(KEY_HEX).unwrap();
    // The builder reproduces the spec's JSON byte for byte, so its token is the spec's token.
    assert_eq!(String::from_utf8(known_payload().to_json()).unwrap(), KNOWN_JSON);
    assert_eq!(hex::encode(sign(key.bytes(), KNOWN_JSON.as_bytes())), KNOWN_HMAC);
    let token = seal(key.bytes(), KNOWN_JSON.as_bytes());
    assert!(token.starts_with("FGdPrcVqbKYfVryYwYIzX6BU"), "{token}");
    assert!(token.ends_with("U/naCApg"), "{token}");
    assert_eq!(known_payload().seal(&key), token);
    // 32 bytes of HMAC + 145 of JSON = 177, padded to 192 = 256 base64 characters.
    assert_eq!(KNOWN_JSON.len(), 145);
    assert_eq!(token.len(), 256);
}

#[test]
fn single_use_and_optional_fields_serialize_in_the_documented_shape() {
    let target = VncTarget {
        hostname: "10.1.2.3".into(),
        port: 5901,
        password: Some(SecretString::from("pw+/=")),
        guacd_hostname: Some("node-7.internal".into()),
    };
    let auth = JsonAuth::single_vnc("alice", 1_700_000_000_000, "vm-42", &target, 4822);
    assert_eq!(
        String::from_utf8(auth.to_json()).unwrap(),
        r#"{"username":"alice","expires":1700000000000,"singleUse":true,"connections":{"vm-42":{"protocol":"vnc","parameters":{"hostname":"10.1.2.3","password":"pw+/=","port":"5901"},"guacdHostname":"node-7.internal","guacdPort":4822}}}"#
    );
    let unrouted = VncTarget { guacd_hostname: None, password: None, ..target };
    let json = String::from_utf8(JsonAuth::single_vnc("bob", 1, "vm", &unrouted, 4822).to_json()).unwrap();
    assert!(!json.contains("guacd") && !json.contains("password"), "{json}");
    let shown = format!("{auth:?}");
    assert!(!shown.contains("pw+/="), "a VNC password never prints: {shown}");
    assert!(shown.contains("password"), "{shown}");
}

#[test]
fn link_url_encodes_the_token_for_form_and_query() {
    let l = link_for("https://desk.example.org/guacamole/", "ab+c/d==");
    assert_eq!(l.api_tokens_url, "https://desk.example.org/guacamole/api/tokens");
    assert_eq!(l.form_body, "data=ab%2Bc%2Fd%3D%3D");
    assert_eq!(l.browser_url, "https://desk.example.org/guacamole/?data=ab%2Bc%2Fd%3D%3D");
    assert!(!format!("{l:?}").contains("ab%2B"), "the token never prints");
}

fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the openssl CLI is installed (Debian ships it); this test needs it");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

const ZERO_IV: &str = "00000000000000000000000000000000";

#[tokio::test]
async fn openssl_opens_a_token_the_hive_issued() {
    let key_hex = hex::encode(rand::random::<[u8; 16]>());
    let cfg = GuacamoleConfig {
        url: Some("https://desk.example.org/guacamole".into()),
        json_secret_key: Some(SecretString::from(key_hex.clone())),
        link_ttl_secs: 120,
        ..GuacamoleConfig::default()
    };
    let g = Guacamole::from_config(&cfg).unwrap().unwrap();
    let target = VncTarget {
        hostname: "10.9.8.7".into(),
        port: 5905,
        password: Some(SecretString::from("s3cr3t")),
        guacd_hostname: Some("node-3".into()),
    };
    let before = super::now_ms();
    let link = g.link("carol", "vm-9", &target, None, None).await.unwrap();
    let after = super::now_ms();
    let encoded = link.strip_prefix("https://desk.example.org/guacamole/?data=").expect(&link);
    let token = percent_encoding::percent_decode_str(encoded).decode_utf8().unwrap().to_string();

    let plain = openssl(&["enc", "-d", "-aes-128-cbc", "-K", &key_hex, "-iv", ZERO_IV, "-nosalt", "-a", "-A"], token.as_bytes());
    assert!(plain.len() > 32);
    let (mac, json) = plain.split_at(32);
    let hmac_key = format!("hexkey:{key_hex}");
    let expected = openssl(&["dgst", "-sha256", "-mac", "HMAC", "-macopt", &hmac_key, "-binary"], json);
    assert_eq!(mac, &expected[..], "the first 32 bytes are HMAC-SHA256(key, json)");

    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    assert_eq!(v["username"], "carol");
    assert_eq!(v["singleUse"], true);
    let expires = v["expires"].as_u64().unwrap();
    assert!((before + 120_000..=after + 120_000).contains(&expires), "expires {expires} is issue time + ttl");
    let c = &v["connections"]["vm-9"];
    assert_eq!(c["protocol"], "vnc");
    assert_eq!(c["parameters"], serde_json::json!({"hostname": "10.9.8.7", "port": "5905", "password": "s3cr3t"}));
    assert_eq!(c["guacdHostname"], "node-3");
    assert_eq!(c["guacdPort"], 4822);

    // And the other way: openssl seals the same bytes into the same token (zero IV, so the
    // encryption is deterministic).
    let resealed = openssl(&["enc", "-aes-128-cbc", "-K", &key_hex, "-iv", ZERO_IV, "-nosalt", "-a", "-A"], &plain);
    assert_eq!(String::from_utf8(resealed).unwrap().trim_end(), token);
}

#[test]
fn openssl_reproduces_the_known_answer() {
    let mac = openssl(&["dgst", "-sha256", "-mac", "HMAC", "-macopt", &format!("hexkey:{KEY_HEX}"), "-binary"], KNOWN_JSON.as_bytes());
    assert_eq!(hex::encode(&mac), KNOWN_HMAC);
    let mut plain = mac;
    plain.extend_from_slice(KNOWN_JSON.as_bytes());
    let token = openssl(&["enc", "-aes-128-cbc", "-K", KEY_HEX, "-iv", ZERO_IV, "-nosalt", "-a", "-A"], &plain);
    let key = JsonSecretKey::parse(KEY_HEX).unwrap();
    assert_eq!(String::from_utf8(token).unwrap().trim_end(), seal(key.bytes(), KNOWN_JSON.as_bytes()));
}
