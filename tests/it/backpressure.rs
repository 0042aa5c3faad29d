//! Back-pressure through the relay (issue 14): with every socket buffer on
//! the path full in both directions (a client that pipelines big queries
//! and does not read their big answers yet), the relay parks instead of
//! buffering without bound, loses nothing, and drains once the client
//! reads. Over a Unix-socket upstream (registered for readability only,
//! waiting for writability only when a write blocks) and over TLS.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::ProxyOptions;
use common::raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An identity of this test's own: other tests revoke all of
/// `BILLING_ID`'s leases, which would end these sessions.
const BACKPRESSURE_ID: &str = "spiffe://example.org/ns/prod/sa/backpressure";

/// Each query carries this many bytes up and gets them back down.
const PAYLOAD: usize = 64 * 1024;
/// 64 MiB each way: far more than every buffer on the path holds.
const QUERIES: usize = 1024;
/// The client reads nothing until it has written at least this much and
/// its writes have stalled: the unread answers fill the downstream buffers,
/// so PostgreSQL stops reading and the upstream direction fills too.
const WRITTEN_BEFORE_READING: u64 = 1024 * 1024;

async fn both_directions_full_then_drained(unix_upstream: bool) {
    let template = if unix_upstream { "bp_unix" } else { "bp_tls" };
    let mut options = ProxyOptions::templates(&[template]);
    options.upstream_unix_socket = unix_upstream;
    options.listen_extra = "workers = 1".into();
    let proxy = common::proxy::start_proxy_with_extra_config(
        options,
        &format!("[[policy]]\nspiffe_id = \"{BACKPRESSURE_ID}\"\ntemplates = [\"{template}\"]"),
    )
    .await;
    let tls = raw::session(
        &proxy,
        &proxy.svid(BACKPRESSURE_ID),
        template,
        "backpressure",
    )
    .await;
    let (mut reader, mut writer) = tokio::io::split(tls);

    let literal = "x".repeat(PAYLOAD);
    let one = raw::query(&format!("SELECT '{literal}'"));
    let written = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let (counted, done) = (written.clone(), finished.clone());
    let writer_task = tokio::spawn(async move {
        for _ in 0..QUERIES {
            writer.write_all(&one).await.unwrap();
            counted.fetch_add(one.len() as u64, Ordering::SeqCst);
        }
        writer.flush().await.unwrap();
        done.store(true, Ordering::SeqCst);
        writer
    });

    // Wait until the writer has stalled: no progress for 300 ms.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (written.load(Ordering::SeqCst), Instant::now());
    loop {
        assert!(
            Instant::now() < deadline,
            "the client's writes never stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = written.load(Ordering::SeqCst);
        if now != last.0 || finished.load(Ordering::SeqCst) {
            last = (now, Instant::now());
        }
        if finished.load(Ordering::SeqCst)
            || (now >= WRITTEN_BEFORE_READING && last.1.elapsed() >= Duration::from_millis(300))
        {
            break;
        }
    }
    assert!(
        !finished.load(Ordering::SeqCst),
        "64 MiB went up with nothing read down: something buffers without bound"
    );

    // Now read every answer: one row of PAYLOAD bytes, a CommandComplete
    // and a ReadyForQuery per query, in order.
    let mut rows = 0;
    let mut ready = 0;
    while ready < QUERIES {
        let mut header = [0u8; 5];
        reader.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        reader.read_exact(&mut body).await.unwrap();
        match header[0] {
            b'D' => {
                // Int16 column count, Int32 length, the value.
                let value_len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                assert_eq!(value_len as usize, PAYLOAD);
                assert!(body[6..].iter().all(|&b| b == b'x'));
                rows += 1;
            }
            b'Z' => ready += 1,
            b'E' => panic!("server error: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    assert_eq!(rows, QUERIES);
    let mut writer = tokio::time::timeout(Duration::from_secs(30), writer_task)
        .await
        .expect("the client's writes complete once it reads")
        .unwrap();
    writer.write_all(&raw::message(b'X', &[])).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_upstream_parks_and_drains_both_directions() {
    both_directions_full_then_drained(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_parks_and_drains_both_directions() {
    both_directions_full_then_drained(false).await;
}
