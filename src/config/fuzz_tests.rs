//! Fuzz tests (proptest) of `Config::parse`: TOML syntax and validation take any text without
//! panicking, and an accepted config plans and renders (the daemon does both at start and on
//! every reload). Inputs: arbitrary text, and the shipped configs with lines dropped,
//! duplicated or swapped and values replaced by hostile ones.

use proptest::prelude::*;

use super::*;

const EXAMPLE: &str = include_str!("../../deploy/etp.example.toml");

/// Values that have broken parsers elsewhere: huge, negative, empty, odd types and CIDRs.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("4294967296".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e309".to_string()),
        Just("\"\"".to_string()),
        Just("[]".to_string()),
        Just("[[]]".to_string()),
        Just("{}".to_string()),
        Just("\"0.0.0.0/0\"".to_string()),
        Just("\"::/0\"".to_string()),
        Just("\"10.0.0.0/33\"".to_string()),
        Just("\"1-0\"".to_string()),
        Just("\"65535-65536\"".to_string()),
        Just("[\"fd00::/8\"]".to_string()),
        Just("\"127.0.0.1:15001\"".to_string()),
        Just("\"\\u0000\"".to_string()),
        "\"[ -~]{0,40}\"",
        any::<i64>().prop_map(|v| v.to_string()),
    ]
}

/// The shipped configs, mutated line by line.
fn mutated() -> impl Strategy<Value = String> {
    let base = prop::sample::select(vec![EMBEDDED_DEFAULT, EXAMPLE]);
    let edits = prop::collection::vec(
        (any::<prop::sample::Index>(), 0u8..4, hostile_value()),
        1..5,
    );
    (base, edits).prop_map(|(text, edits)| {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        for (at, op, value) in edits {
            if lines.is_empty() {
                break;
            }
            let i = at.index(lines.len());
            match op {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                2 => {
                    let j = (i + 1) % lines.len();
                    lines.swap(i, j);
                }
                _ => {
                    if let Some((key, _)) = lines[i].split_once('=') {
                        lines[i] = format!("{key}= {value}");
                    }
                }
            }
        }
        lines.join("\n")
    })
}

fn check(text: &str) {
    if let Ok(cfg) = Config::parse(text, "fuzz.toml") {
        let desired = crate::plan::plan(&cfg);
        let _ = desired.to_string();
    }
}

proptest! {
    #[test]
    fn any_text_is_parsed_or_refused(text in "\\PC{0,200}") {
        check(&text);
    }

    #[test]
    fn mutated_configs_are_parsed_or_refused(text in mutated()) {
        check(&text);
    }
}
