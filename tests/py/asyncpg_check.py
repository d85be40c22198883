"""asyncpg client check (extended protocol, binary results, named prepared statements):
prints one JSON line of what it saw. Run directly and through Portcullis."""
import asyncio
import json
import sys

import asyncpg

host, port = sys.argv[1].rsplit(":", 1)
assert host.startswith("127."), "loopback only"


async def main():
    c = await asyncpg.connect(host=host, port=int(port), user="app", database="shop",
                              timeout=10, ssl=False)
    out = {}
    rows = await c.fetch("SELECT id, name, email, tags, score::text AS score FROM contacts ORDER BY id")
    out["rows"] = [dict(r) for r in rows]
    st = await c.prepare("SELECT name, email FROM contacts WHERE id = $1")
    out["prepared"] = [dict(await st.fetchrow(i)) for i in (1, 2)]
    async with c.transaction():
        await c.executemany("INSERT INTO contacts (name, email, tags) VALUES ($1, $2, $3)",
                            [("Cy", "cy@example.com", ["c"]), ("Di", "di@example.com", [])])
        out["in_transaction"] = [dict(r) for r in await c.fetch(
            "SELECT name, email, tags FROM contacts WHERE id > 2 ORDER BY id")]
    out["count"] = await c.fetchval("SELECT count(*) FROM contacts")
    # Types asyncpg has no codec for: it asks the catalog about them first (in the middle
    # of preparing the statement, after a Flush), then decodes with the answer.
    out["composite"] = str(await c.fetchval("SELECT ROW(1, 'x')::pair"))
    # The database's own types in binary: an enum, an array of it, a composite, a domain
    # over citext and citext itself.
    out["own_types"] = [dict(r) for r in await c.fetch(
        "SELECT mood, moods, card, handle, alias FROM contacts ORDER BY id")]
    out["range"] = str(await c.fetchval("SELECT int4range(1, 5)"))
    out["catalog"] = await c.fetchval(
        "SELECT relname FROM pg_catalog.pg_class WHERE relname = 'contacts'")
    await c.close()
    print(json.dumps(out, sort_keys=True, default=str))


asyncio.run(asyncio.wait_for(main(), 60))
