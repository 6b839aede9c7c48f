"""The access policy's storage on real PostgreSQL and on SQLite: the document, its history,
node tags, revisions, and two writers racing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from cyphonic.errors import AlreadyExists, NotFound
from cyphonic.registry import AuditEvent, create_engine, make_sessionmaker
from cyphonic_nms.access import AccessControl
from cyphonic_nms.policy_store import SqlPolicyStore
from cyphonic_testing.nms import add_node
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

DOC1 = {"rules": [{"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": [22]}]}
DOC2 = {"rules": []}


@pytest.fixture
async def engine(registry_url: str) -> AsyncIterator[AsyncEngine]:
    e = create_engine(registry_url)
    yield e
    await e.dispose()


async def test_document_history_and_revisions(engine: AsyncEngine) -> None:
    store = SqlPolicyStore(make_sessionmaker(engine))
    assert (await store.current()).document is None and await store.revision() == 0
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first = await store.replace(DOC1, actor="alice", now=t0)
    assert first.revision == 1
    second = await store.replace(DOC2, actor="bob", now=t0 + timedelta(minutes=1))
    assert second.revision == 2
    await store.replace(None, actor="carol", now=t0 + timedelta(minutes=2))
    current = await store.current()
    assert current.document is None and current.revision == 3 and current.updated_by == "carol"
    history = await store.history(limit=10)
    assert [(h.actor, h.revision, h.old_document, h.new_document) for h in history] == [
        ("carol", 3, DOC2, None),
        ("bob", 2, DOC1, DOC2),
        ("alice", 1, None, DOC1),
    ]
    assert history[-1].at == t0  # back in UTC, aware, on both databases
    older = await store.history(limit=10, before=history[1].change_id)
    assert [h.actor for h in older] == ["alice"]
    with pytest.raises(AlreadyExists):
        await store.replace(DOC1, actor="dave", now=t0, expected_revision=2)
    assert await store.revision() == 3


async def test_tags_bump_the_revision_and_are_audited(engine: AsyncEngine) -> None:
    sessions = make_sessionmaker(engine)
    store = SqlPolicyStore(sessions)
    await add_node(sessions, "a")
    await add_node(sessions, "b")
    now = datetime.now(UTC)
    assert await store.tags("a.cyphonic.internal") == {}
    await store.set_tags("a.cyphonic.internal", {"group": "eng,ops"}, actor="admin", now=now)
    assert await store.tags("A.cyphonic.internal") == {"group": "eng,ops"}
    assert await store.revision() == 1
    assert await store.history(limit=5) == []  # tags are not policy documents
    with pytest.raises(NotFound):
        await store.set_tags("ghost.cyphonic.internal", {}, actor="admin", now=now)
    async with sessions() as s:
        audit = (await s.scalars(select(AuditEvent).where(AuditEvent.action == "node_tags"))).all()
    assert [(e.subject, e.detail) for e in audit] == [
        ("a.cyphonic.internal", {"old": {}, "new": {"group": "eng,ops"}})
    ]
    nodes = {n.fqdn: n for n in await store.nodes()}
    assert nodes["a.cyphonic.internal"].tags == {"group": "eng,ops"}
    assert nodes["b.cyphonic.internal"].ipv4 is None  # no lease yet
    access = AccessControl(store)
    await access.refresh()
    # Allow-all (no policy stored) needs no tags: the node list is not even loaded.
    assert access.info("a.cyphonic.internal").groups == set()
    await store.replace({"rules": []}, actor="admin", now=now)
    await access.refresh()
    assert access.info("a.cyphonic.internal").groups == {"eng", "ops"}


async def test_concurrent_writers_never_lose_a_change(engine: AsyncEngine) -> None:
    store = SqlPolicyStore(make_sessionmaker(engine))
    now = datetime.now(UTC)

    async def write(i: int) -> bool:
        try:
            await store.replace({"rules": [], "description": f"w{i}"}, actor=f"w{i}", now=now)
            return True
        except AlreadyExists:
            return False

    results = await asyncio.gather(*(write(i) for i in range(8)))
    history = await store.history(limit=50)
    # every write that reported success is in the history, each with its own revision
    assert len(history) == sum(results) >= 1
    assert sorted(h.revision for h in history) == list(range(1, len(history) + 1))
    assert await store.revision() == len(history)
