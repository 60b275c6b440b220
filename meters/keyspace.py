"""The ledger's key layout, and what every part of the ledger shares.

One Redis, or a Redis / Valkey Cluster (``connect(url, cluster=True)``): every key a script
touches for one account carries the account id as its *hash tag* (the part in braces,
``{acct_…}``), so Redis Cluster keeps them in one slot and each script runs on one node,
atomically. A channel's keys carry its account's id (``{mpp_0x…}``), a process' liveness keys
its owner id. What spans accounts (the open deposits, holds and channels, the owners of holds,
the accounts with queued Stripe usage) is kept outside the scripts, as indexes written before
the money moves and read by readers that tolerate stale entries (see each one).

* ``acct:{<id>}``: the account (a hash), ``acct:{<id>}:keys`` the hashes of its API keys,
  ``paykeys:{<id>}`` those a payment issued, ``key:<hash>`` the account a key opens;
* ``res:{<id>}:<rid>``: a stream's reservation, listed in ``held:{<id>}:<owner>``;
  ``fenced:{<id>}`` the dead owners the account was swept of; ``usage:{<id>}`` its queued
  Stripe usage;
* ``alive:{<owner>}``, ``dead:{<owner>}``: a process' heartbeat and its death certificate;
  ``owner:{<owner>}:accounts`` the accounts it holds money on; ``owners`` every owner.

:class:`Keyspace` is the base of :class:`~meters.ledger.Ledger` and its parts
(:class:`~meters.liveness.Liveness`, :class:`~meters.apikeys.ApiKeys`): the client, the prefix,
this process' owner id, and the keys' names.
"""

from __future__ import annotations

import re
import uuid

import redis.asyncio as aioredis

from meters.errors import AccountNotFound


def check_prefix(prefix: str) -> str:
    """A key prefix must not hold a brace: Redis Cluster hashes a key by its first ``{...}``,
    which must be the account's (or owner's) tag the ledger puts after the prefix."""
    if "{" in prefix or "}" in prefix:
        raise ValueError("key_prefix must not contain '{' or '}' (Redis Cluster hash tags)")
    return prefix


def account_key(prefix: str, account_id: str) -> str:
    """The hash of an account (its id is the hash tag of every key about it)."""
    return f"{prefix}acct:{{{account_id}}}"


#: Account ids are opaque tokens ("acct_<hex>", "x402_<hex>") that never contain ":", the
#: separator of the ledger's keys.
ACCOUNT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class Keyspace:
    """The client, the key prefix, this process' owner id, and the names of the keys."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "ts:") -> None:
        self.redis = client
        self.prefix = check_prefix(prefix)
        #: The pub/sub channel the scripts that add money announce the account on
        #: (:mod:`meters.notices` wakes the streams paused on it).
        self.credit_channel = f"{prefix}credited"
        #: With Stripe meter events on: the set of accounts whose usage queue
        #: (:meth:`usage_key`) may hold records, which the final charge adds an account to
        #: when it queued one (None: off). See gateway/rails/stripe/meter_events.py.
        self.usage_index: str | None = None
        #: Accounts that have a Stripe customer (listed before the account exists): the meter
        #: events sender's full walk finds every usage queue from it.
        self.customers_index = f"{prefix}stripe:customers"
        #: This process' generation (see :mod:`meters.liveness`).
        self.owner = f"{uuid.uuid4().hex[:12]}"

    # -- keys -------------------------------------------------------------------------------
    # The hash tag (in braces) of every key a script touches for one account is the account
    # id, so all of them share a slot on a cluster. Account ids never hold a brace or ':'.
    def _acct(self, account_id: str) -> str:
        if not ACCOUNT_ID.fullmatch(account_id):
            # An id with ":" would name another key of the ledger (an account's key set,
            # ``acct:{id}:keys``), which Redis then refuses as the wrong type: not an account.
            raise AccountNotFound(f"no account {account_id[:100]!r}", param="account_id")
        return account_key(self.prefix, account_id)

    def account_key(self, account_id: str) -> str:
        """The Redis key of an account's hash (for tools and tests)."""
        return self._acct(account_id)

    def _res(self, account_id: str, rid: str) -> str:
        return f"{self.prefix}res:{{{account_id}}}:{rid}"

    def _held(self, account_id: str, owner: str) -> str:
        """The reservations ``owner`` holds on the account (owner last: sweep.lua, lease.lua
        and settle.lua derive another owner's set from this one by its suffix)."""
        return f"{self.prefix}held:{{{account_id}}}:{owner}"

    def _fenced(self, account_id: str) -> str:
        return f"{self.prefix}fenced:{{{account_id}}}"

    def usage_key(self, account_id: str) -> str:
        """The account's queue of Stripe usage records (settle.lua pushes to it)."""
        return f"{self.prefix}usage:{{{account_id}}}"

    def alive_key(self, owner: str) -> str:
        return f"{self.prefix}alive:{{{owner}}}"

    def _dead(self, owner: str) -> str:
        return f"{self.prefix}dead:{{{owner}}}"

    def _owner_accounts(self, owner: str) -> str:
        return f"{self.prefix}owner:{{{owner}}}:accounts"

    def _owners(self) -> str:
        return f"{self.prefix}owners"

    def _apikey(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    def _keys(self, account_id: str) -> str:
        return f"{self._acct(account_id)}:keys"

    def _paykeys(self, account_id: str) -> str:
        # Outside ``acct:`` (whose SCAN lists accounts): the keys payments issued, by age.
        return f"{self.prefix}paykeys:{{{account_id}}}"
