//! SPIFFE IDs (from a client certificate's URI SAN) and the policy's ID
//! patterns: parsing never panics, accepts exactly the reference grammar
//! below (written from the SPIFFE ID spec, independently of src/identity.rs),
//! and `matches` agrees with a reference matcher.
//!
//! Input: `<pattern>\n<id>` (lossy UTF-8). Each half is also tried with
//! `spiffe://` in front, so the fuzzer need not rediscover the scheme.
#![no_main]

use ephemera::identity::{SpiffeId, MAX_SPIFFE_ID_LEN};
use ephemera::policy::IdPattern;
use libfuzzer_sys::fuzz_target;

/// `spiffe://<td>[/<seg>]*`, td = [a-z0-9._-]+, seg = [A-Za-z0-9._-]+ but
/// not `.` or `..`; with `wildcards`, a segment may also be `*` or `**`, and
/// `**` only last. Returns (trust domain, segments).
fn reference(s: &str, wildcards: bool) -> Option<(&str, Vec<&str>)> {
    if s.len() > MAX_SPIFFE_ID_LEN {
        return None;
    }
    let rest = s.strip_prefix("spiffe://")?;
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let td_ok = !td.is_empty()
        && td
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'));
    if !td_ok {
        return None;
    }
    if rest.len() == td.len() {
        return Some((td, Vec::new()));
    }
    let segments: Vec<&str> = path.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let wild = wildcards && (*seg == "*" || (*seg == "**" && i == segments.len() - 1));
        let plain = !seg.is_empty()
            && *seg != "."
            && *seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !(wild || plain) {
            return None;
        }
    }
    Some((td, segments))
}

fn reference_matches(pattern: &[&str], id: &[&str]) -> bool {
    match (pattern.split_first(), id.split_first()) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some((&"**", rest)), _) => rest.is_empty() && !id.is_empty(),
        (Some(_), None) => false,
        (Some((&"*", p)), Some((_, i))) => reference_matches(p, i),
        (Some((want, p)), Some((got, i))) => want == got && reference_matches(p, i),
    }
}

fn check(pattern_text: &str, id_text: &str) {
    let id = SpiffeId::parse(id_text);
    let id_ref = reference(id_text, false);
    assert_eq!(
        id.is_ok(),
        id_ref.is_some(),
        "SpiffeId::parse({id_text:?}) = {id:?}"
    );
    if let (Ok(id), Some((td, segments))) = (&id, &id_ref) {
        assert_eq!(id.as_str(), id_text);
        assert_eq!(id.to_string(), id_text);
        assert_eq!(id.trust_domain(), *td);
        assert_eq!(id.segments().collect::<Vec<_>>(), *segments);
        // Every ID is a pattern that matches (only) itself.
        let own = IdPattern::parse(id_text).expect("an ID is a valid pattern");
        assert!(own.matches(id));
    }

    let pattern = IdPattern::parse(pattern_text);
    let pattern_ref = reference(pattern_text, true);
    assert_eq!(
        pattern.is_ok(),
        pattern_ref.is_some(),
        "IdPattern::parse({pattern_text:?}) = {pattern:?}"
    );
    if let (Ok(pattern), Some((ptd, psegs)), Ok(id), Some((td, segs))) =
        (&pattern, &pattern_ref, &id, &id_ref)
    {
        let expected = ptd == td && reference_matches(psegs, segs);
        assert_eq!(
            pattern.matches(id),
            expected,
            "{pattern_text:?} matches {id_text:?}"
        );
        if !pattern_text.contains('*') {
            assert_eq!(pattern.matches(id), pattern_text == id_text);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pattern, id) = text.split_once('\n').unwrap_or((&text, &text));
    check(pattern, id);
    let with_scheme = |s: &str| format!("spiffe://{s}");
    check(&with_scheme(pattern), &with_scheme(id));
    check(&with_scheme(pattern), id);
    check(pattern, &with_scheme(id));
});
