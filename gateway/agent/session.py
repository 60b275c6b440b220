"""Agent side of an MPP session: the credentials an agent sends to open a channel, pay with
vouchers, top up and close (specs/mpp/draft-evm-session-00.md, "Credential Schema").

:class:`SessionWallet` holds the agent's key and one channel's state; it reads the gateway's
``session`` challenge (pympp parses the ``WWW-Authenticate`` header), checks it against what
the agent accepts (chain, token, a spending cap), and signs. It keeps the cumulative amount it
has authorized and never signs past its cap.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import mpp
from eth_account import Account

from gateway.rails.evm import EvmNetwork
from gateway.rails.mpp.channel import (
    ZERO_ADDRESS,
    compute_channel_id,
    sign_open_authorization,
    sign_top_up_authorization,
    sign_voucher,
)


class SessionCapExceeded(RuntimeError):
    """Authorizing this would take the session past the agent's spending cap."""


def session_challenge(headers: Any) -> mpp.Challenge | None:
    """The ``evm``/``session`` challenge among a 402's ``WWW-Authenticate`` lines."""
    for value in headers.get_list("www-authenticate"):
        if not value.lower().startswith("payment "):
            continue
        challenge = mpp.Challenge.from_www_authenticate(value)
        if challenge.method == "evm" and challenge.intent == "session":
            return challenge
    return None


@dataclass
class SessionWallet:
    """One agent key, one channel, a cap on what it authorizes (atomic units)."""

    private_key: str
    token_name: str
    token_version: str
    spend_cap: int
    deposit: int
    channel_id: str | None = None
    authorized: int = 0
    channel_deposit: int = 0
    challenge: mpp.Challenge | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def address(self) -> str:
        return str(Account.from_key(self.private_key).address)

    def _terms(self, challenge: mpp.Challenge) -> tuple[EvmNetwork, str, str]:
        request = challenge.request
        details = request["methodDetails"]
        network = EvmNetwork(network=f"eip155:{details['chainId']}",
                             chain_id=int(details["chainId"]), rpc_url="",
                             asset=request["currency"], token_name=self.token_name,
                             token_version=self.token_version, relayer_key="")
        return network, details["escrowContract"], request["recipient"]

    def credential(self, challenge: mpp.Challenge, payload: dict[str, Any],
                   source: str | None = None) -> str:
        """The ``Authorization`` header value for ``payload`` answering ``challenge``."""
        return mpp.Credential(challenge=challenge.to_echo(), payload=payload,
                              source=source).to_authorization()

    def open(self, challenge: mpp.Challenge) -> str:
        """Open a channel with ``deposit`` (``feePayer: true``: the gateway relays it)."""
        if self.deposit > self.spend_cap:
            raise SessionCapExceeded(f"a deposit of {self.deposit} is above the cap")
        network, escrow, payee = self._terms(challenge)
        salt = "0x" + secrets.token_hex(32)
        now = int(time.time())
        auth = sign_open_authorization(self.private_key, network, escrow=escrow, payee=payee,
                                       deposit=self.deposit, salt=salt, valid_after=0,
                                       valid_before=now + 600)
        channel_id = compute_channel_id(payer=self.address, payee=payee,
                                        token=network.asset, salt=salt,
                                        authorized_signer=ZERO_ADDRESS, escrow=escrow,
                                        chain_id=network.chain_id)
        voucher = sign_voucher(self.private_key, channel_id=channel_id, cumulative_amount=0,
                               chain_id=network.chain_id, escrow=escrow)
        self.channel_id, self.channel_deposit, self.challenge = channel_id, self.deposit, \
            challenge
        return self.credential(challenge, {
            "action": "open", "type": "authorization", "channelId": channel_id,
            "salt": salt, "cumulativeAmount": "0", "signature": auth.signature,
            "voucherSignature": voucher.signature,
            "authorization": {"from": auth.from_, "to": auth.to, "value": str(auth.value),
                              "validAfter": str(auth.valid_after),
                              "validBefore": str(auth.valid_before), "nonce": auth.nonce}})

    def voucher(self, cumulative: int, *, action: str = "voucher",
                challenge: mpp.Challenge | None = None) -> str:
        """A voucher (or the close) for ``cumulative`` in all, within the cap."""
        challenge = challenge or self.challenge
        if challenge is None or self.channel_id is None:
            raise RuntimeError("open a channel first")
        with self._lock:
            if cumulative > self.spend_cap:
                raise SessionCapExceeded(f"authorizing {cumulative} in all would exceed the "
                                         f"cap of {self.spend_cap}")
            self.authorized = max(self.authorized, cumulative)
        network, escrow, _ = self._terms(challenge)
        signed = sign_voucher(self.private_key, channel_id=self.channel_id,
                              cumulative_amount=cumulative, chain_id=network.chain_id,
                              escrow=escrow)
        return self.credential(challenge, {"action": action, "channelId": self.channel_id,
                                           "cumulativeAmount": str(cumulative),
                                           "signature": signed.signature})

    def top_up(self, additional: int, challenge: mpp.Challenge | None = None) -> str:
        """Add ``additional`` to the channel's deposit (relayed by the gateway); the caller
        adds it to :attr:`channel_deposit` once the gateway took it."""
        challenge = challenge or self.challenge
        if challenge is None or self.channel_id is None:
            raise RuntimeError("open a channel first")
        if self.channel_deposit + additional > self.spend_cap:
            raise SessionCapExceeded("the top-up would take the deposit past the cap")
        network, escrow, _ = self._terms(challenge)
        salt = "0x" + secrets.token_hex(32)
        auth = sign_top_up_authorization(self.private_key, network, escrow=escrow,
                                         channel_id=self.channel_id,
                                         additional_deposit=additional, top_up_salt=salt,
                                         valid_after=0, valid_before=int(time.time()) + 600)
        return self.credential(challenge, {
            "action": "topUp", "type": "authorization", "channelId": self.channel_id,
            "additionalDeposit": str(additional), "salt": salt, "signature": auth.signature,
            "authorization": {"from": auth.from_, "to": auth.to, "value": str(auth.value),
                              "validAfter": str(auth.valid_after),
                              "validBefore": str(auth.valid_before), "nonce": auth.nonce}})
