//! Micro-benchmarks of the per-session work Ephemera adds on its own CPU:
//! SVID verification, SCRAM key generation and the client exchange,
//! front-door decoding and lease comment encoding.
//!
//! Run: `cargo bench --bench micro`
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use std::sync::Arc;

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ephemera::identity::SvidVerifier;
use ephemera::session::protocol::{decode_first_packet, encode_startup};
use ephemera_engine::scram::ScramClient;
use ephemera_engine::{Lease, ScramSecret};
use rustls::pki_types::UnixTime;

/// The integration tests' PKI (a bench cannot `mod common;` the whole harness).
#[allow(dead_code)]
#[path = "../tests/common/pki.rs"]
mod pki;

fn svid_verification(c: &mut Criterion) {
    let ca = pki::TestCa::new("bench CA");
    let leaf = ca.svid("spiffe://example.org/ns/prod/sa/billing");

    let verifier = SvidVerifier::new(
        &[ca.cert_der()],
        ["example.org".to_owned()],
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .expect("verifier");
    let chain = leaf.chain_der();
    c.bench_function("svid_verify", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(&chain), UnixTime::now())
                .expect("valid")
        })
    });
}

fn scram(c: &mut Criterion) {
    c.bench_function("scram_generate_and_verifier", |b| {
        b.iter(|| black_box(ScramSecret::generate().verifier()))
    });
    let secret = ScramSecret::generate();
    let verifier = secret.verifier();
    let salt = verifier.split(['$', ':']).nth(2).expect("salt").to_owned();
    c.bench_function("scram_client_exchange", |b| {
        b.iter(|| {
            let mut client = ScramClient::new(&secret);
            let first = String::from_utf8(client.client_first()).expect("utf8");
            let nonce = first.rsplit("r=").next().expect("nonce");
            let server_first = format!("r={nonce}server,s={salt},i=1");
            black_box(client.client_final(server_first.as_bytes()).expect("final"))
        })
    });
}

fn front_door(c: &mut Criterion) {
    let startup = encode_startup(&[
        ("user", "billing_rw"),
        ("database", "billing"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
    ]);
    c.bench_function("decode_startup", |b| {
        b.iter(|| decode_first_packet(black_box(BytesMut::from(&startup[..]))).expect("startup"))
    });
}

fn lease_comment(c: &mut Criterion) {
    let now = time::OffsetDateTime::now_utc();
    let lease = Lease {
        id: uuid::Uuid::new_v4(),
        engine: "postgres",
        kind: ephemera_engine::LeaseKind::Session,
        template: "billing_rw".into(),
        role: "eph_billing_rw_abcdefghijklmnopqr".into(),
        identity: "spiffe://example.org/ns/prod/sa/billing".into(),
        subject: None,
        database: "billing".into(),
        client_addr: None,
        issued_at: now,
        expires_at: now + time::Duration::minutes(15),
        max_expires_at: now + time::Duration::hours(1),
    };
    c.bench_function("lease_comment_json", |b| {
        b.iter(|| black_box(lease.comment().to_json()))
    });
}

criterion_group!(benches, svid_verification, scram, front_door, lease_comment);
criterion_main!(benches);
