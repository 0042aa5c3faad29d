//! Abrupt client disconnects (issue 6): a client whose socket goes away
//! mid-COPY or mid-query leaves no role behind and does not disturb the
//! other sessions.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{
    role_prefix, roles_with_prefix, wait_until_no_roles, ProxyOptions, TestProxy, BILLING_ID,
    DATABASE, GROUP,
};
use common::raw::{message, query, read_until};
use common::{cluster, TestCert};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const DROPPED: &str = "compat_drop";
const GOOD: &str = "compat_good";
const DISCONNECTS: usize = 50;
/// Disconnecting clients running at the same time.
const CONCURRENCY: usize = 5;

async fn raw_session(proxy: &TestProxy, cert: &TestCert) -> TlsStream<TcpStream> {
    common::raw::session(proxy, cert, DROPPED, "compat-drop").await
}

/// One client that goes away abruptly: mid-COPY at a random byte (most of
/// them) or mid-query; half of them with a TCP reset instead of a FIN.
async fn abrupt_client(proxy: &TestProxy, cert: &TestCert, i: usize) {
    let mut tls = raw_session(proxy, cert).await;
    let (cut, reset) = {
        let mut rng = rand::thread_rng();
        (rng.gen_range(0..300_000usize), rng.gen_bool(0.5))
    };
    if i % 5 == 4 {
        // Mid-query: a long statement, then gone (after a random part of it
        // was sent, or all of it).
        let q = query("SELECT pg_sleep(30), count(*) FROM compat_sink");
        let upto = if cut % 2 == 0 { q.len() } else { cut % q.len() };
        tls.write_all(&q[..upto]).await.expect("query");
        tls.flush().await.expect("flush");
    } else {
        tls.write_all(&query("COPY compat_sink (id, name) FROM STDIN"))
            .await
            .expect("COPY");
        read_until(&mut tls, b'G').await;
        let mut stream = Vec::with_capacity(cut + 64);
        let mut row = 0u64;
        while stream.len() < cut {
            stream.extend_from_slice(&message(
                b'd',
                format!("{row}\tabrupt row {row} ünï\n").as_bytes(),
            ));
            row += 1;
        }
        stream.truncate(cut);
        for chunk in stream.chunks(16 * 1024) {
            tls.write_all(chunk).await.expect("copy data");
        }
        tls.flush().await.expect("flush");
    }
    let (tcp, _) = tls.into_inner();
    if reset {
        tcp.set_zero_linger().expect("SO_LINGER 0");
    }
    drop(tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_abrupt_disconnects_leave_no_role_and_spare_other_sessions() {
    let proxy = Arc::new(TestProxy::start(ProxyOptions::templates(&[DROPPED, GOOD])).await);
    cluster()
        .exec_sql(
            DATABASE,
            &format!(
                "CREATE TABLE compat_sink (id bigint, name text);
                 GRANT SELECT, INSERT ON compat_sink TO {GROUP};"
            ),
        )
        .await;
    let cert = proxy.svid(BILLING_ID);

    // A good session working all along.
    let good = proxy
        .connect(Some(&cert), GOOD, DATABASE)
        .await
        .expect("the good session connects");
    good.batch_execute("CREATE TEMP TABLE work (n int)")
        .await
        .expect("temp table");
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut n = 0i32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                good.execute("INSERT INTO work VALUES ($1)", &[&n])
                    .await
                    .expect("the good session keeps working");
                let count: i64 = good
                    .query_one("SELECT count(*) FROM work", &[])
                    .await
                    .expect("the good session keeps working")
                    .get(0);
                assert_eq!(count, i64::from(n));
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            good
        })
    };

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CONCURRENCY {
        let (proxy, cert, next) = (proxy.clone(), cert.clone(), next.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= DISCONNECTS {
                    return;
                }
                abrupt_client(&proxy, &cert, i).await;
            }
        }));
    }
    for client in clients {
        client.await.expect("an abrupt client");
    }
    let prefix = role_prefix(DROPPED);
    assert!(
        wait_until_no_roles(&prefix, Duration::from_secs(5)).await,
        "5 s after {DISCONNECTS} abrupt disconnects, roles remain: {:?}",
        roles_with_prefix(&prefix).await
    );
    let admin = cluster().superuser(DATABASE).await;
    let leftovers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE starts_with(usename, $1)",
            &[&prefix],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(leftovers, 0, "no backend of a dropped client remains");
    let copied: i64 = admin
        .query_one("SELECT count(*) FROM compat_sink", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(copied, 0, "no interrupted COPY committed anything");

    stop.store(true, Ordering::Relaxed);
    let good = worker.await.expect("the good session never failed");
    assert!(rounds.load(Ordering::Relaxed) > 0);
    let user: String = good
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("the good session still works")
        .get(0);
    assert!(user.starts_with(&role_prefix(GOOD)), "{user}");
    drop(good);
    assert!(wait_until_no_roles(&role_prefix(GOOD), Duration::from_secs(5)).await);
    eprintln!(
        "{DISCONNECTS} abrupt disconnects in {:?}",
        started.elapsed()
    );
    Arc::try_unwrap(proxy)
        .ok()
        .expect("the only proxy handle")
        .shutdown()
        .await;
}
