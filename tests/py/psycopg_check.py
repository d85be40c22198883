"""psycopg 3 client check: prints one JSON line of what it saw.

Run directly and through Portcullis; the outputs must be identical.
"""
import json
import sys

import psycopg

host, port = sys.argv[1].rsplit(":", 1)
assert host.startswith("127."), "loopback only"
out = {}
with psycopg.connect(host=host, port=port, user="app", dbname="shop", connect_timeout=10) as conn:
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS py; CREATE TABLE py (id int, name text, amount numeric, at date)")
        cur.executemany("INSERT INTO py VALUES (%s, %s, %s, %s)",
                        [(i, f"name {i}", i * 1.5, "2024-01-0%d" % (i % 9 + 1)) for i in range(20)])
        conn.commit()
        cur.execute("SELECT id, name, amount::text, at::text FROM py WHERE id > %s ORDER BY id", (5,))
        out["rows"] = cur.fetchall()
        # binary results
        cur.execute("SELECT id, name FROM py ORDER BY id LIMIT 3", binary=True)
        out["binary"] = cur.fetchall()
        # server-side prepared statement (prepare threshold) and pipeline mode
        for _ in range(6):
            cur.execute("SELECT count(*) FROM py WHERE id < %s", (10,), prepare=True)
        out["prepared"] = cur.fetchone()
        with conn.pipeline():
            cur.execute("SELECT 1")
            cur.execute("SELECT 2")
        try:
            cur.execute("SELECT 1/0")
        except psycopg.errors.DivisionByZero as e:
            out["error"] = e.sqlstate
        conn.rollback()
        with cur.copy("COPY (SELECT id, name FROM py ORDER BY id) TO STDOUT") as copy:
            out["copy"] = b"".join(bytes(b) for b in copy).decode()
    conn.commit()
out["ok"] = True
print(json.dumps(out, default=str))
