"""Long-term memory through its API: remember, recall, forget, filters, ranking, retention,
erasure, bad input, and a database from a newer edgeos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.errors import InvalidRequestError, SchemaVersionError
from edgeos.manifests.agent import Memory
from edgeos.memory import retention
from edgeos.memory.erasure import erase, reclaim
from edgeos.memory.handle import AgentMemory
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import MIGRATIONS, Database, Migration, file_bytes
from tests.stored import stored_bytes

runner = CliRunner()


def memory(
    db: Database, host: ModelHost, *, agent: str = "notes", now: float | None = 1000.0,
    **config: Any,
) -> AgentMemory:  # fmt: skip
    cfg = Memory.model_validate({"embedding_model": "hash-embed", "fields": ["supplier"], **config})
    return AgentMemory(db, host, agent, cfg, now=now)


def counts(db: Database) -> tuple[int, int, int]:
    conn = db.reader()
    records, vectors, fields = (
        int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
        for t in ("memory_records", "memory_vectors", "memory_fields")
    )
    return records, vectors, fields


def test_remember_recall_forget(db: Database, host: ModelHost) -> None:
    m = memory(db, host)
    acme = m.remember("Acme delivers fresh milk every tuesday", {"supplier": "acme"})
    m.remember("Zenith bread arrives late on fridays", {"supplier": "zenith"})
    m.remember("Alice prefers oat milk", subject="alice")
    assert counts(db) == (0, 0, 0)  # buffered until commit
    done = m.commit()
    assert len(done.remembered) == 3
    assert counts(db) == (3, 3, 2)

    found = m.recall("who delivers milk on tuesday", k=2)
    assert found[0].id == acme
    assert found[0].metadata == {"supplier": "acme"}
    assert found[0].similarity >= found[1].similarity

    m.forget(id=acme)
    m.commit()
    assert acme not in [r.id for r in m.recall("milk tuesday", k=5)]
    assert counts(db) == (2, 2, 1)  # the vector and the filter row went with it


def test_a_filtered_recall_returns_k_when_k_exist(db: Database, host: ModelHost) -> None:
    m = memory(db, host)
    # Many records very like the query, and five rare ones unlike it: filtering after the
    # top-k would find none of the rare ones.
    for i in range(300):
        m.remember(f"milk delivery schedule number {i}", {"supplier": "common"})
    rare = [m.remember(f"rare note {i} about gravel", {"supplier": "rare"}) for i in range(5)]
    m.commit()
    found = m.recall("milk delivery schedule", k=5, where={"supplier": "rare"})
    assert sorted(r.id for r in found) == sorted(rare)
    assert len(m.recall("milk", k=8, where={"supplier": ["rare", "common"]})) == 8
    assert m.recall("milk", k=3, where={"supplier": "nobody"}) == []


def test_subject_filter_and_erasure_of_one_subject(db: Database, host: ModelHost) -> None:
    m = memory(db, host)
    m.remember("Alice likes oat milk", subject="alice")
    m.remember("Alice asked for a call back", subject="alice")
    m.remember("Bob likes espresso", subject="bob")
    m.commit()
    assert {r.subject for r in m.recall("likes", k=5, where={"subject": "alice"})} == {"alice"}
    m.forget(subject="alice")
    m.commit()
    assert [r.subject for r in m.recall("likes", k=5)] == ["bob"]


def test_ranking_weights_recency_and_importance(db: Database, host: ModelHost) -> None:
    day = 86400.0
    old = memory(db, host, now=1000.0)
    old_id = old.remember("the cold room thermostat is broken", importance=0.1)
    old.commit()
    new = memory(db, host, now=1000.0 + 60 * day)
    new_id = new.remember("the cold room thermostat is broken again", importance=0.9)
    new.commit()
    query = "the cold room thermostat is broken"
    plain = memory(db, host, now=1000.0 + 60 * day)
    assert plain.recall(query, k=2)[0].id == old_id  # the exact words win on similarity alone
    ranked = memory(
        db, host, now=1000.0 + 60 * day,
        ranking={"similarity": 1.0, "recency": 1.0, "half_life": "30d"},
    )  # fmt: skip
    first, second = ranked.recall(query, k=2)
    assert first.id == new_id
    assert first.score > second.score
    important = memory(db, host, now=1000.0 + 60 * day, ranking={"importance": 2.0})
    assert important.recall(query, k=2)[0].id == new_id


def test_ttl_expiry(db: Database, host: ModelHost) -> None:
    m = memory(db, host, now=1000.0, retention={"ttl": "1h"})
    short = m.remember("a short-lived note about the delivery", ttl="10s")
    m.remember("a note that lives for the default hour")
    m.commit()
    later = memory(db, host, now=1011.0, retention={"ttl": "1h"})
    assert short not in [r.id for r in later.recall("note delivery", k=5)]  # never returned
    assert counts(db)[0] == 2  # still in the file until a pass removes it
    later.remember("a new note")
    done = later.commit()
    assert done.expired == [short]
    with db.transaction() as conn:
        assert len(retention.expire_all(conn, 1011.0 + 3601)) == 2
    assert counts(db) == (0, 0, 0)


@pytest.mark.parametrize(
    ("eviction", "survivors"),
    [("importance", {"b", "c", "d"}), ("lru", {"a", "c", "d"}), ("oldest", {"b", "c", "d"})],
)
def test_eviction_under_max_records(
    db: Database, host: ModelHost, eviction: str, survivors: set[str]
) -> None:
    cap: dict[str, Any] = {"retention": {"max_records": 3, "eviction": eviction}}
    m = memory(db, host, now=1000.0, **cap)
    ids = {
        "a": m.remember("alpha apples", importance=0.1),
        "b": m.remember("bravo bread", importance=0.9),
        "c": m.remember("charlie cheese", importance=0.8),
    }
    m.commit()
    reader = memory(db, host, now=2000.0, **cap)
    reader.recall("alpha apples", k=1)  # 'a' was used last
    reader.commit()
    late = memory(db, host, now=3000.0, **cap)
    ids["d"] = late.remember("delta dates", importance=0.7)
    done = late.commit()
    left = {name for name, i in ids.items() if i not in done.evicted}
    assert left == survivors
    assert counts(db)[0] == 3


def test_eviction_under_max_bytes(db: Database, host: ModelHost) -> None:
    # A record of the hashing model takes 512 vector bytes plus its text and metadata
    # (about 530 here): two fit under the cap, three do not.
    m = memory(db, host, retention={"max_bytes": 1200})
    for i in range(3):
        m.remember(f"record number {i}", importance=0.1 * (i + 1))
    done = m.commit()
    conn = db.reader()
    records, size = conn.execute("SELECT records, bytes FROM memory_usage").fetchone()
    assert (records, size <= 1200) == (2, True)
    left = [r[0] for r in conn.execute("SELECT text FROM memory_records ORDER BY seq")]
    assert left == ["record number 1", "record number 2"]  # the least important went
    assert len(done.evicted) == 1
    with pytest.raises(InvalidRequestError, match="more than the agent's"):
        m.remember("x" * 3000)


def test_bad_input_raises_and_writes_nothing(db: Database, host: ModelHost) -> None:
    m = memory(db, host, max_text_bytes=100)
    m.remember("a good note")
    bad: list[tuple[Any, str]] = [
        (lambda: m.remember(""), "non-empty"),
        (lambda: m.remember("   "), "non-empty"),
        (lambda: m.remember("x" * 101), "more than memory.max_text_bytes"),
        (lambda: m.remember("note", vector=[0.1] * 3), "3 dimensions.*gives 128"),
        (lambda: m.remember("note", vector=[0.0] * 128), "not all zeros"),
        (lambda: m.remember("note", ttl="soon"), "not a duration"),
        (lambda: m.remember("note", ttl=-5), "negative"),
        (lambda: m.remember("note", importance=3), "not between 0 and 1"),
        (lambda: m.remember("note", {"when": object()}), "not JSON"),
        (lambda: m.remember("note", {"supplier": {"nested": 1}}), "filterable"),
        (lambda: m.remember("note", subject=""), "subject"),
        (lambda: m.recall("note", where={"colour": "red"}), "unknown filter field 'colour'"),
        (lambda: m.recall("note", where={"supplier": []}), "1 to"),
        (lambda: m.recall("note", k=0), "k must be"),
        (lambda: m.forget(), "exactly one"),
        (lambda: m.forget(subject="a", id="b"), "exactly one"),
    ]
    for call, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            call()
    m.commit()
    assert counts(db)[0] == 1  # only the good note


def test_erasure_removes_the_bytes_from_the_file_and_reclaims_space(
    db: Database, host: ModelHost
) -> None:
    m = memory(db, host)
    secret = "SECRET-ALICE-prefers-the-blue-delivery-window"
    for i in range(40):
        m.remember(f"{secret} note {i}", {"supplier": "alice-co"}, subject="alice")
    for i in range(400):
        m.remember(f"ordinary note {i} about bread and milk deliveries", subject=f"s{i % 7}")
    m.commit()
    db.checkpoint()
    assert secret.encode() in db.path.read_bytes()
    size_before = file_bytes(db.path)

    gone = erase(db, subject="alice")
    assert len(gone) == 40
    done = reclaim(db)
    assert done.wal_cleared
    for path in (db.path, db.path.with_name(db.path.name + "-wal")):
        if path.exists():
            assert secret.encode() not in stored_bytes([path]), path
            assert b"alice-co" not in stored_bytes([path]), path
    assert file_bytes(db.path) < size_before
    assert counts(db) == (400, 400, 0)
    assert memory(db, host).recall("blue delivery window", k=5, where={"subject": "alice"}) == []


def test_an_index_follows_writes_made_through_another_connection(
    db: Database, host: ModelHost
) -> None:
    m = memory(db, host)
    kept = m.remember("the forklift needs a new battery")
    doomed = m.remember("the forklift battery was replaced", subject="mechanic")
    m.commit()
    assert {r.id for r in m.recall("forklift battery", k=5)} == {kept, doomed}
    with Database(db.path) as other:  # as the CLI would, from another process
        erase(other, subject="mechanic")
        AgentMemory(other, host, "notes", m.config, now=1000.0).remember("battery for the forklift")
    assert doomed not in {r.id for r in m.recall("forklift battery", k=5)}


def test_a_database_from_a_newer_edgeos_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node" / "node.db"
    future = (*MIGRATIONS, Migration("0099_memory_v2", "CREATE TABLE memory_v2 (x INTEGER);"))
    with Database(path, future):
        pass
    with pytest.raises(SchemaVersionError, match="0099_memory_v2"):
        Database(path).open()
    result = runner.invoke(app, ["memory", "stats", "--data-dir", str(tmp_path / "node")])
    assert isinstance(result.exception, SchemaVersionError)  # main() prints it as one line
    assert "newer edgeos" in str(result.exception)


def test_memory_commands(tmp_path: Path, model_dir: Path) -> None:
    from tests.memory_support import make_bundle

    data = tmp_path / "node"
    args = ["--data-dir", str(data)]
    model = model_dir / "hash-embed.onnx"
    added = runner.invoke(app, ["model", "add", str(model), "--manifest",
                                str(model.with_suffix(".yaml")), *args])  # fmt: skip
    assert added.exit_code == 0, added.output
    bundle = make_bundle(tmp_path, "def first(ctx, data):\n    return data\n", steps=["first"])
    assert runner.invoke(app, ["agent", "add", str(bundle), *args]).exit_code == 0
    with Database(data / "node.db") as db:
        host = ModelHost(ModelRegistry(db, data / "models"))
        m = memory(db, host, now=None)
        m.remember("Acme delivers milk on tuesdays", {"supplier": "acme"}, subject="acme-rep")
        m.remember("Zenith bread is often late", {"supplier": "zenith"})
        m.commit()
        host.close()

    stats = runner.invoke(app, ["memory", "stats", *args])
    assert stats.exit_code == 0, stats.output
    assert "notes" in stats.output
    assert "change log: 2 entries" in stats.output
    found = runner.invoke(app, ["memory", "search", "notes", "milk tuesday", "--k", "1", *args])
    assert found.exit_code == 0, found.output
    assert "Acme" in found.output
    filtered = runner.invoke(
        app, ["memory", "search", "notes", "milk", "--where", "supplier=zenith", *args]
    )
    assert "Zenith" in filtered.output
    assert "Acme" not in filtered.output
    bad = runner.invoke(app, ["memory", "search", "notes", "milk", "--where", "colour=red", *args])
    assert isinstance(bad.exception, InvalidRequestError)
    assert "unknown filter field 'colour'" in str(bad.exception)
    replica = tmp_path / "replica"
    shipped = runner.invoke(
        app, ["memory", "replicate", "--to", str(replica), "--node", "n1", *args]
    )
    assert "shipped 2 change(s)" in shipped.output, shipped.output
    unknown = runner.invoke(app, ["memory", "replicate", "--to", str(replica), *args])
    assert "give its id with --node" in str(unknown.exception)
    other = ["--data-dir", str(tmp_path / "replacement")]
    restored = runner.invoke(app, ["memory", "restore", "--from", str(replica), "--node", "n1",
                                   *other])  # fmt: skip
    assert "restored 2 record(s)" in restored.output, restored.output
    erased = runner.invoke(app, ["memory", "forget", "--subject", "acme-rep", *args])
    assert erased.exit_code == 0, erased.output
    assert "erased 1 record(s)" in erased.output
    expired = runner.invoke(app, ["memory", "expire", *args])
    assert "0 expired" in expired.output
