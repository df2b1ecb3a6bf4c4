//! The API as the README describes it exists in the proto: every field name and enum value the
//! README's API section puts in backticks is one of `metald.v1`'s (or of the health service's),
//! so the documentation cannot drift from the API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use prost::Message;

fn names() -> (Vec<String>, Vec<String>) {
    let mut fields = Vec::new();
    let mut values = Vec::new();
    let fds = prost_types::FileDescriptorSet::decode(metald_api::FILE_DESCRIPTOR_SET).unwrap();
    fn walk(m: &prost_types::DescriptorProto, fields: &mut Vec<String>, values: &mut Vec<String>) {
        fields.extend(m.field.iter().map(|f| f.name().to_string()));
        for e in &m.enum_type {
            values.extend(e.value.iter().map(|v| v.name().to_string()));
        }
        for n in &m.nested_type {
            walk(n, fields, values);
        }
    }
    for f in &fds.file {
        for m in &f.message_type {
            walk(m, &mut fields, &mut values);
        }
        for e in &f.enum_type {
            values.extend(e.value.iter().map(|v| v.name().to_string()));
        }
    }
    (fields, values)
}

#[test]
fn every_field_and_value_the_readme_names_exists() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find("### The API")
        .expect("the README's API section");
    let section = &readme[start + 4..];
    let section = &section[..section.find("\n### ").unwrap_or(section.len())];
    let (fields, values) = names();
    let mut checked = 0;
    for (i, tok) in section.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let lower = !tok.is_empty()
            && tok
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
            && tok.as_bytes()[0].is_ascii_lowercase();
        let upper = tok.len() > 2
            && tok
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'_' || b.is_ascii_digit());
        if lower && tok.contains('_') {
            assert!(
                fields.iter().any(|f| f == tok),
                "the README names `{tok}`, which no metald.v1 message has"
            );
            checked += 1;
        } else if upper {
            assert!(
                values
                    .iter()
                    .any(|v| v == tok || v.ends_with(&format!("_{tok}"))),
                "the README names `{tok}`, which is no metald.v1 enum value"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} names checked: is the section still there?"
    );
}
