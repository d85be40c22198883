//! Test client on tokio-postgres (extended protocol, binary results, pipelining, COPY,
//! LISTEN/NOTIFY, cancellation). Runs a named scenario against `host:port` and prints one
//! JSON object of what it saw, so a run through Portcullis can be compared with a direct one.
//!
//! ```text
//! pc-pg HOST:PORT USER PASSWORD DB SCENARIO
//! ```
//! Scenarios: `suite`, `big` (1,000,000 rows, digested), `cancel`, `rows SQL...` (typed
//! rows of each statement), `distinct SQL` (streamed; row count and distinct values of
//! column 1), `reload FILE` (prepares statements on table `t`, runs them, prints
//! `prepared`, waits until FILE exists, runs them again: for policy changes in between).

use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _, pin_mut};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_postgres::{
    AsyncMessage, Client, NoTls, SimpleQueryMessage,
    types::{FromSql, Kind, Type},
};

fn err(e: &tokio_postgres::Error) -> Value {
    match e.as_db_error() {
        Some(db) => json!({"code": db.code().code(), "message": db.message()}),
        None => json!({"error": e.to_string()}),
    }
}

/// Rows of a simple query as text.
async fn simple(c: &Client, sql: &str) -> Value {
    match c.simple_query(sql).await {
        Ok(msgs) => Value::Array(
            msgs.iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(json!(
                        (0..r.len())
                            .map(|i| r.get(i).map(str::to_owned))
                            .collect::<Vec<_>>()
                    )),
                    SimpleQueryMessage::CommandComplete(n) => Some(json!({ "complete": n })),
                    _ => None,
                })
                .collect(),
        ),
        Err(e) => err(&e),
    }
}

async fn suite(c: &Client, notes: &mut Vec<Value>) -> Value {
    let mut out = serde_json::Map::new();
    let ddl = c
        .batch_execute(
            "DROP TABLE IF EXISTS items; CREATE TABLE items (id int PRIMARY KEY, name text, \
             price numeric(10,2), data jsonb, tags text[], at timestamptz, blob bytea, f float8)",
        )
        .await;
    out.insert("ddl".into(), json!(ddl.is_ok()));
    // Prepared insert with binary parameters.
    let ins = c
        .prepare_typed(
            "INSERT INTO items VALUES ($1, $2, $3::text::numeric, $4::text::jsonb, $5, $6::text::timestamptz, $7, $8)",
            &[Type::INT4, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT_ARRAY, Type::TEXT, Type::BYTEA, Type::FLOAT8],
        )
        .await
        .expect("prepare insert");
    for i in 0..20i32 {
        let name = format!("item {i} ünïcödé");
        let price = format!("{}.{:02}", i * 3, i);
        let data = format!("{{\"n\": {i}, \"odd\": {}}}", i % 2 == 1);
        let tags = vec![format!("t{i}"), "x".to_owned()];
        let blob = vec![i as u8, 0, 255, 10];
        c.execute(
            &ins,
            &[
                &i,
                &name,
                &price,
                &data,
                &tags,
                &"2024-02-29 12:34:56+00",
                &blob,
                &(f64::from(i) / 3.0),
            ],
        )
        .await
        .expect("insert");
    }
    // Binary results of a prepared select: raw column bytes through Debug of typed values.
    let rows = c
        .query(
            "SELECT id, name, price::text, data, tags, at, blob, f FROM items ORDER BY id",
            &[],
        )
        .await
        .expect("select");
    let typed: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, serde_json::Value>(3),
                r.get::<_, Vec<String>>(4),
                r.get::<_, std::time::SystemTime>(5),
                r.get::<_, Vec<u8>>(6),
            )
        })
        .collect();
    out.insert("binary_rows".into(), json!(typed));
    // Pipelining: tokio-postgres sends these without waiting for each other.
    let stmt = c
        .prepare("SELECT name FROM items WHERE id = $1")
        .await
        .expect("prepare");
    let futs: Vec<_> = (0..10i32)
        .map(|i| {
            let stmt = stmt.clone();
            async move {
                c.query_one(&stmt, &[&i])
                    .await
                    .map(|r| r.get::<_, String>(0))
            }
        })
        .collect();
    let piped: Vec<Value> = futures_util::future::join_all(futs)
        .await
        .into_iter()
        .map(|r| r.map_or_else(|e| err(&e), |s| json!(s)))
        .collect();
    out.insert("pipelined".into(), json!(piped));
    // Transactions and savepoints.
    out.insert(
        "tx".into(),
        simple(
            c,
            "BEGIN; UPDATE items SET name = 'changed' WHERE id = 1; SAVEPOINT s; \
             UPDATE items SET name = 'lost' WHERE id = 2; ROLLBACK TO SAVEPOINT s; \
             RELEASE SAVEPOINT s; COMMIT; SELECT id, name FROM items WHERE id IN (1, 2) ORDER BY id",
        )
        .await,
    );
    // Errors keep the session usable.
    out.insert(
        "error".into(),
        match c.query("SELECT 1/0", &[]).await {
            Ok(_) => json!("no error"),
            Err(e) => err(&e),
        },
    );
    out.insert("after_error".into(), simple(c, "SELECT 42").await);
    // COPY both ways.
    let sink = c
        .copy_in("COPY items (id, name) FROM STDIN")
        .await
        .expect("copy in");
    pin_mut!(sink);
    use futures_util::SinkExt as _;
    for i in 100..110 {
        sink.send(bytes::Bytes::from(format!("{i}\tcopied {i}\n")))
            .await
            .expect("copy data");
    }
    let copied = sink.finish().await.expect("copy finish");
    out.insert("copy_in".into(), json!(copied));
    let stream = c
        .copy_out("COPY (SELECT id, name, price, tags FROM items ORDER BY id) TO STDOUT WITH (FORMAT csv)")
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("copy out data");
    let all: Vec<u8> = chunks.concat();
    out.insert("copy_out".into(), json!(String::from_utf8_lossy(&all)));
    // Prepared statements at SQL level.
    out.insert(
        "sql_prepare".into(),
        simple(
            c,
            "PREPARE p(int) AS SELECT name FROM items WHERE id = $1; EXECUTE p(3); DEALLOCATE p",
        )
        .await,
    );
    // LISTEN / NOTIFY: the notification arrives on the connection (collected by main).
    let _ = c
        .batch_execute("LISTEN chan; NOTIFY chan, 'hello'; NOTIFY chan, 'again'")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    notes.push(json!("listened"));
    // A notice.
    let _ = c
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'a notice'; END $$")
        .await
        .map_err(|e| notes.push(err(&e)));
    Value::Object(out)
}

async fn big(c: &Client) -> Value {
    let stream = c
        .query_raw(
            "SELECT i, md5(i::text), i::float8 / 7 FROM generate_series(1, 1000000) AS s(i)",
            std::iter::empty::<i32>(),
        )
        .await
        .expect("query");
    pin_mut!(stream);
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(row) = stream.next().await {
        let row = row.expect("row");
        h.update(row.get::<_, i32>(0).to_be_bytes());
        h.update(row.get::<_, String>(1).as_bytes());
        h.update(row.get::<_, f64>(2).to_be_bytes());
        n += 1;
    }
    json!({"rows": n, "sha256": format!("{:x}", h.finalize())})
}

/// Statements prepared (extended protocol and SQL-level PREPARE) under one policy, run
/// again after the test has changed it: what each run returned.
async fn reload(c: &Client, go: &str) -> Value {
    async fn rows(c: &Client, st: &tokio_postgres::Statement) -> Value {
        match c.query(st, &[]).await {
            Ok(rows) => json!(
                rows.iter()
                    .map(
                        |r| match (r.try_get::<_, i32>(0), r.try_get::<_, Option<String>>(1)) {
                            (Ok(id), Ok(email)) => json!([id, email]),
                            (id, email) => json!({"row_error": format!("{id:?} {email:?}")}),
                        }
                    )
                    .collect::<Vec<_>>()
            ),
            Err(e) => err(&e),
        }
    }
    let read = c
        .prepare("SELECT id, email FROM t ORDER BY id")
        .await
        .expect("prepare the read");
    let delete = c
        .prepare("DELETE FROM t WHERE id = $1")
        .await
        .expect("prepare the delete");
    let before = rows(c, &read).await;
    let deleted_before = match c.execute(&delete, &[&3i32]).await {
        Ok(n) => json!(n),
        Err(e) => err(&e),
    };
    let sql_prepare = simple(c, "PREPARE p AS DELETE FROM t WHERE id = 2").await;
    println!("prepared");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::path::Path::new(go).exists() {
        assert!(std::time::Instant::now() < deadline, "{go} never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = rows(c, &read).await;
    let deleted_after = match c.execute(&delete, &[&1i32]).await {
        Ok(n) => json!(n),
        Err(e) => err(&e),
    };
    json!({
        "before": before,
        "deleted_before": deleted_before,
        "sql_prepare": sql_prepare,
        "after": after,
        "deleted_after": deleted_after,
        "still_usable": simple(c, "SELECT 'still usable'").await,
        "sql_execute": simple(c, "EXECUTE p").await,
        "read_again": rows(c, &read).await,
    })
}

async fn cancel(c: &Client) -> Value {
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await.map_err(|e| e.to_string())
    });
    let started = std::time::Instant::now();
    let r = c
        .query("SELECT count(*) FROM generate_series(1, 2000000000)", &[])
        .await;
    let sent = canceller.await.expect("join");
    json!({
        "result": r.map_or_else(|e| err(&e), |_| json!("finished")),
        "cancel_sent": sent.is_ok(),
        "stopped_within_10s": started.elapsed() < Duration::from_secs(10),
        "after": simple(c, "SELECT 'alive'").await,
    })
}

/// A value's bytes in binary format, whatever its type.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// One value as JSON, decoded by its type from the binary format tokio-postgres asks for:
/// an enum as its label, `bytea`, `inet`, a record or an array as `{"binary": hex}`.
fn cell(r: &tokio_postgres::Row, i: usize) -> Value {
    let t = r.columns()[i].type_().clone();
    let raw = |i: usize| r.try_get::<_, Option<Raw>>(i).map(|v| v.map(|Raw(b)| b));
    let v = match (t, r.columns()[i].type_().kind()) {
        (Type::INT4, _) => r.try_get::<_, Option<i32>>(i).map(|v| json!(v)),
        (Type::INT8, _) => r.try_get::<_, Option<i64>>(i).map(|v| json!(v)),
        (Type::JSON | Type::JSONB, _) => r.try_get::<_, Option<Value>>(i).map(|v| json!(v)),
        (_, Kind::Enum(_)) => {
            raw(i).map(|v| json!(v.map(|b| String::from_utf8_lossy(&b).into_owned())))
        }
        (Type::BYTEA | Type::INET, _) | (_, Kind::Composite(_) | Kind::Array(_) | Kind::Pseudo) => {
            raw(i).map(|v| {
                json!(v.map(
                    |b| json!({"binary": b.iter().map(|x| format!("{x:02x}")).collect::<String>()})
                ))
            })
        }
        _ => r.try_get::<_, Option<String>>(i).map(|v| json!(v)),
    };
    v.unwrap_or_else(|e| json!({"decode_error": e.to_string()}))
}

/// Each statement through the extended protocol (binary results); rows as typed JSON.
async fn rows(c: &Client, sqls: &[String]) -> Value {
    let mut out = Vec::new();
    for sql in sqls {
        out.push(match c.query(sql.as_str(), &[]).await {
            Ok(rows) => json!(
                rows.iter()
                    .map(|r| (0..r.len()).map(|i| cell(r, i)).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            ),
            Err(e) => err(&e),
        });
    }
    Value::Array(out)
}

/// Streams one statement, counting rows and the distinct values of column 1 (at most 16).
async fn distinct(c: &Client, sql: &str) -> Value {
    let started = std::time::Instant::now();
    let stream = match c.query_raw(sql, std::iter::empty::<i32>()).await {
        Ok(s) => s,
        Err(e) => return err(&e),
    };
    pin_mut!(stream);
    let mut n = 0u64;
    let mut seen: Vec<Value> = Vec::new();
    while let Some(row) = stream.next().await {
        let row = match row {
            Ok(r) => r,
            Err(e) => return err(&e),
        };
        let v = cell(&row, 1);
        if seen.len() < 16 && !seen.contains(&v) {
            seen.push(v);
        }
        n += 1;
    }
    json!({"rows": n, "distinct": seen, "ms": started.elapsed().as_secs_f64() * 1000.0})
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (host, port) = a[0].rsplit_once(':').expect("HOST:PORT");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    assert!(
        host.starts_with("127.") || host == "::1" || host == "localhost",
        "pc-pg only talks to loopback"
    );
    let conninfo = format!(
        "host={host} port={port} user={} password={} dbname={} connect_timeout=10",
        a[1], a[2], a[3]
    );
    let (client, mut connection) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .unwrap_or_else(|e| {
            println!("{}", json!({"connect_error": e.to_string()}));
            std::process::exit(0);
        });
    // Drive the connection, collecting asynchronous messages.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let driver = tokio::spawn(async move {
        pin_mut!(stream);
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(json!({"notify": n.channel(), "payload": n.payload()}));
                }
                Ok(AsyncMessage::Notice(n)) => {
                    let _ = tx.send(json!({"notice": n.message()}));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(json!({"connection_error": e.to_string()}));
                    break;
                }
            }
        }
    });
    let mut notes = Vec::new();
    let result = match a[4].as_str() {
        "suite" => suite(&client, &mut notes).await,
        "big" => big(&client).await,
        "cancel" => cancel(&client).await,
        "rows" => rows(&client, &a[5..]).await,
        "distinct" => distinct(&client, &a[5]).await,
        "reload" => reload(&client, &a[5]).await,
        other => panic!("unknown scenario {other}"),
    };
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    let mut async_msgs = Vec::new();
    while let Ok(m) = rx.try_recv() {
        async_msgs.push(m);
    }
    println!(
        "{}",
        json!({"result": result, "async": async_msgs, "notes": notes})
    );
}
