"""Bearer tokens and the TokenChecker's memory of accepted ones: a token is accepted without a
query while nothing changed, refused soon after a revocation or a removal made by another process
(the CLI, on the same database file), and at once when it expires."""

from __future__ import annotations

import asyncio
import time

import pytest

from kernelpool.config import Settings
from kernelpool.store import Store, TokenRow
from kernelpool.users import tokens
from kernelpool.users.accounts import UserService
from kernelpool.users.tokens import TokenChecker, check_token, create_token, hash_token
from tests.unit.conftest import Clock


class CountingStore(Store):
    """The server's Store, counting its token lookups: the memory is there to spare them."""

    lookups = 0

    async def token_by_hash(self, token_hash: str) -> TokenRow | None:
        self.lookups += 1
        return await super().token_by_hash(token_hash)


async def test_a_token_is_stored_only_as_its_hash(store: Store, users: UserService) -> None:
    token_id, token = await create_token(store, "alice")
    assert token.startswith(f"kp_{token_id}_") and len(token) > 40
    assert [(row.id, row.user) for row in await store.list_tokens("alice")] == [(token_id, "alice")]
    assert (await check_token(store, token)).user == "alice"
    assert (await check_token(store, token + "x")).refused == "unknown"
    assert (await check_token(store, hash_token(token))).refused == "unknown", "the hash is no token"


async def test_a_revocation_by_another_process_takes_effect_at_the_next_recheck(settings: Settings, users: UserService) -> None:
    server = CountingStore(settings.db_path)
    await server.open()
    cli = await Store(settings.db_path).open()  # `kernelpool tokens revoke`: another connection
    try:
        token_id, token = await create_token(cli, "alice")
        checker = TokenChecker(server, recheck=0.2)
        assert (await checker.check(token)).user == "alice"
        for _ in range(20):
            assert (await checker.check(token)).user == "alice"
        assert server.lookups == 1, "accepted from memory while nothing changed"
        assert await cli.revoke_token(token_id)
        deadline = time.monotonic() + 2
        while (verdict := await checker.check(token)).user is not None:
            assert time.monotonic() < deadline, "still accepted long after the revocation"
            await asyncio.sleep(0.02)
        assert verdict.refused == "revoked"
        assert (await checker.check(token)).refused == "revoked", "refusals are not remembered as acceptances"
    finally:
        await cli.close()
        await server.close()


async def test_removing_the_user_forgets_its_tokens(settings: Settings, store: Store, users: UserService) -> None:
    _, token = await create_token(store, "alice")
    _, other = await create_token(store, "bob")
    checker = TokenChecker(store, recheck=0)
    assert (await checker.check(token)).user == "alice" and (await checker.check(other)).user == "bob"
    await store.set_removing("alice", removing=True)  # `users remove` marks the user first
    assert (await checker.check(token)).refused == "unknown"
    assert (await checker.check(other)).user == "bob"


async def test_an_expired_token_is_refused_at_once_even_from_memory(store: Store, users: UserService, clock: Clock,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "time", clock)  # the token expires when the test says, not with the machine's load
    _, token = await create_token(store, "alice", expires_at=clock.time() + 0.3)
    checker = TokenChecker(store, recheck=3600)  # no recheck of the store during this test
    verdict = await checker.check(token)
    assert verdict.user == "alice" and verdict.expires_at is not None
    clock.advance(0.29)
    assert (await checker.check(token)).user == "alice"
    clock.advance(0.02)
    assert (await checker.check(token)).refused == "expired"


async def test_a_user_added_again_under_the_same_name_comes_back_with_another_uid(store: Store, users: UserService) -> None:
    _, old = await create_token(store, "alice")
    uid = (await check_token(store, old)).uid
    await store.remove_user("alice", None)
    assert (await check_token(store, old)).refused == "unknown", "a removed user's tokens go with it"
    await users.add("alice")
    _, new = await create_token(store, "alice")
    again = await check_token(store, new)
    assert again.user == "alice" and again.uid is not None and again.uid != uid
