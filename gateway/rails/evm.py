"""EIP-3009 (``transferWithAuthorization``) verification and settlement on EVM chains.

This is the chain side of x402's ``exact`` scheme on EVM (specs/x402/schemes/exact/
scheme_exact_evm.md, section 1): the payer signs an EIP-712 ``TransferWithAuthorization``; we
check it off-chain and against the token's state, then our relayer key submits it and pays gas.

Failures raise the gateway's errors:

* :class:`~gateway.errors.PaymentRejected` with ``code`` = the x402 error code (see ``ERR_*``),
* :class:`~gateway.errors.ServiceUnavailable` when the RPC node cannot be reached or times out,
* :class:`~gateway.errors.UpstreamError` when the node answers with a non-revert error.

Money is ``int`` atomic units throughout.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from pydantic import SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)

from gateway.errors import InvalidPayment, PaymentRejected, ServiceUnavailable, UpstreamError

# x402 error codes (spec section 9 and the SDK's mechanisms/evm/constants.py).
ERR_RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
ERR_VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
ERR_VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"
ERR_VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
ERR_SIGNATURE = "invalid_exact_evm_payload_signature"
ERR_NONCE_USED = "invalid_exact_evm_nonce_already_used"
ERR_INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
ERR_SIMULATION_FAILED = "invalid_exact_evm_transaction_simulation_failed"
ERR_TRANSFER_EVENT_MISMATCH = "invalid_exact_evm_transfer_event_mismatch"
ERR_TRANSACTION_STATE = "invalid_transaction_state"

# secp256k1 group order / 2: a larger ``s`` is the malleable twin, which FiatToken rejects.
_SECP256K1N_HALF = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
_HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX_SIG = re.compile(r"^0x[0-9a-fA-F]{130}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_UINT256_MAX = 2**256 - 1
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()

# Revert strings of Circle's FiatTokenV2 (and our TestUSDC) -> x402 codes.
_REVERT_CODES: tuple[tuple[str, str], ...] = (
    ("invalid signature", ERR_SIGNATURE),
    ("authorization is not yet valid", ERR_VALID_AFTER),
    ("authorization is expired", ERR_VALID_BEFORE),
    ("authorization is used or canceled", ERR_NONCE_USED),
    ("transfer amount exceeds balance", ERR_INSUFFICIENT_BALANCE),
)

# Only what settlement touches, so any EIP-3009 token (real USDC included) works.
EIP3009_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "balanceOf", "stateMutability": "view",
     "inputs": [{"name": "account", "type": "address"}],
     "outputs": [{"name": "", "type": "uint256"}]},
    {"type": "function", "name": "authorizationState", "stateMutability": "view",
     "inputs": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
     "outputs": [{"name": "", "type": "bool"}]},
    {"type": "function", "name": "transferWithAuthorization", "stateMutability": "nonpayable",
     "inputs": [{"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
                {"name": "v", "type": "uint8"}, {"name": "r", "type": "bytes32"},
                {"name": "s", "type": "bytes32"}],
     "outputs": []},
]

_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}

# Connection-level failures: the node is down or unreachable -> 503.
_RPC_DOWN: tuple[type[BaseException], ...] = (
    aiohttp.ClientError, OSError, asyncio.TimeoutError, ProviderConnectionError, TimeExhausted,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Eip3009Authorization:
    """A signed EIP-3009 ``TransferWithAuthorization`` (from x402's ``payload``).

    ``nonce`` is 0x + 64 hex (bytes32), ``signature`` 0x + 130 hex (65 bytes r||s||v).
    Construction validates shapes and raises :class:`InvalidPayment` naming the field.
    """

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str

    def __post_init__(self) -> None:
        for name in ("from_", "to"):
            if not _ADDRESS.match(getattr(self, name)):
                raise InvalidPayment(f"authorization.{name.rstrip('_')} is not an address",
                                     param=f"authorization.{name.rstrip('_')}")
        for name in ("value", "valid_after", "valid_before"):
            number = getattr(self, name)
            if isinstance(number, bool) or not isinstance(number, int) \
                    or not 0 <= number <= _UINT256_MAX:
                raise InvalidPayment(f"authorization.{name} is not a uint256", param=name)
        if not _HEX32.match(self.nonce):
            raise InvalidPayment("authorization.nonce is not 32 bytes of hex",
                                 param="authorization.nonce")
        if not _HEX_SIG.match(self.signature):
            raise InvalidPayment("signature is not 65 bytes of hex", param="signature")

    @property
    def payer(self) -> str:
        """Checksummed payer address."""
        return to_checksum_address(self.from_)

    def vrs(self) -> tuple[int, bytes, bytes]:
        """Split the signature; v normalised to 27/28 (some signers emit 0/1)."""
        raw = bytes.fromhex(self.signature[2:])
        v = raw[64]
        if v < 27:
            v += 27
        return v, raw[:32], raw[32:64]


@dataclass(frozen=True)
class EvmNetwork:
    """One EVM chain + EIP-3009 token the gateway accepts, and the relayer that settles on it."""

    network: str  # CAIP-2, e.g. "eip155:31337"
    chain_id: int
    rpc_url: str
    asset: str  # token contract address
    token_name: str  # EIP-712 domain name (USDC on Base: "USD Coin")
    token_version: str  # EIP-712 domain version ("2")
    relayer_key: SecretStr | str = field(repr=False)
    confirmations: int = 1
    rpc_timeout: float = 10.0
    receipt_timeout: float = 120.0

    def relayer_secret(self) -> str:
        key = self.relayer_key
        return key.get_secret_value() if isinstance(key, SecretStr) else key

    @property
    def relayer_address(self) -> str:
        return str(Account.from_key(self.relayer_secret()).address)


@dataclass(frozen=True)
class SettlementResult:
    """A settled authorization: the on-chain transfer of exactly ``amount`` from ``payer``.

    ``block_number`` is None when a remote facilitator settled (it does not report blocks).
    """

    tx_hash: str
    payer: str
    amount: int
    block_number: int | None
    network: str = ""


@dataclass(frozen=True)
class TransactionStatus:
    """What the chain says about a transaction hash (for crash recovery)."""

    state: Literal["unknown", "pending", "success", "reverted"]
    block_number: int | None = None
    confirmations: int = 0


def typed_data(auth: Eip3009Authorization, network: EvmNetwork) -> dict[str, Any]:
    """The EIP-712 typed-data document the payer signs (as eth_account expects it)."""
    return {
        "types": _TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": network.token_name,
            "version": network.token_version,
            "chainId": network.chain_id,
            "verifyingContract": to_checksum_address(network.asset),
        },
        "message": {
            "from": to_checksum_address(auth.from_),
            "to": to_checksum_address(auth.to),
            "value": auth.value,
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": HexBytes(auth.nonce),
        },
    }


def recover_signer(auth: Eip3009Authorization, network: EvmNetwork) -> str | None:
    """Address that signed ``auth`` for ``network``'s domain, or None if the signature is bad."""
    v, r, s = auth.vrs()
    if v not in (27, 28) or int.from_bytes(s, "big") > _SECP256K1N_HALF:
        return None
    message = encode_typed_data(full_message=typed_data(auth, network))
    try:
        return str(Account.recover_message(message, vrs=(v, r, s)))
    except (ValueError, TypeError):  # eth_keys.BadSignature is a ValueError subclass
        return None


def sign_authorization(private_key: str, network: EvmNetwork, *, to: str, value: int,
                       valid_after: int, valid_before: int, nonce: str) -> Eip3009Authorization:
    """Sign a ``TransferWithAuthorization`` with a local key (agents and tests)."""
    account = Account.from_key(private_key)
    unsigned = Eip3009Authorization(from_=account.address, to=to, value=value,
                                    valid_after=valid_after, valid_before=valid_before,
                                    nonce=nonce, signature="0x" + "00" * 65)
    signed = account.sign_message(encode_typed_data(full_message=typed_data(unsigned, network)))
    return Eip3009Authorization(from_=account.address, to=to, value=value,
                                valid_after=valid_after, valid_before=valid_before, nonce=nonce,
                                signature="0x" + bytes(signed.signature).hex())


def revert_code(message: str, default: str = ERR_SIMULATION_FAILED) -> str:
    """Map a token revert string to an x402 code."""
    lowered = message.lower()
    for needle, code in _REVERT_CODES:
        if needle in lowered:
            return code
    return default


class EvmSettler:
    """Verifies and settles EIP-3009 authorizations; one instance per process.

    Holds one ``AsyncWeb3`` per RPC URL and one lock per (RPC, relayer) so concurrent
    settlements never allocate the same Ethereum transaction nonce.
    """

    def __init__(self, *, valid_before_margin: int = 6,
                 clock: Callable[[], float] = time.time,
                 poll_interval: float = 0.05) -> None:
        # Margin: an authorization that expires within the time settlement takes would revert
        # on-chain after we served the request (the SDK's facilitator uses 6 s too).
        self.valid_before_margin = valid_before_margin
        self._clock = clock
        self._poll = poll_interval
        self._w3: dict[str, AsyncWeb3[AsyncHTTPProvider]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    # ------------------------------------------------------------------ plumbing

    def web3(self, network: EvmNetwork) -> AsyncWeb3[AsyncHTTPProvider]:
        """The shared ``AsyncWeb3`` for ``network.rpc_url``."""
        w3 = self._w3.get(network.rpc_url)
        if w3 is None:
            provider = AsyncHTTPProvider(
                network.rpc_url,
                request_kwargs={"timeout": aiohttp.ClientTimeout(total=network.rpc_timeout)},
                exception_retry_configuration=None,  # fail fast; the caller decides on retry
            )
            w3 = AsyncWeb3(provider)
            self._w3[network.rpc_url] = w3
        return w3

    def _token(self, network: EvmNetwork) -> Any:
        return self.web3(network).eth.contract(address=to_checksum_address(network.asset),
                                               abi=EIP3009_ABI)

    async def _rpc(self, network: EvmNetwork, call: Callable[[], Awaitable[T]]) -> T:
        """Run one RPC call, translating transport failures (reverts pass through)."""
        try:
            return await asyncio.wait_for(call(), network.rpc_timeout)
        except ContractLogicError:
            raise
        except TransactionNotFound:
            raise
        except _RPC_DOWN as exc:
            raise ServiceUnavailable(f"{network.network} RPC unreachable: {exc}") from exc
        except Web3RPCError as exc:
            raise UpstreamError(f"{network.network} RPC error: {exc}") from exc

    async def aclose(self) -> None:
        """Close HTTP sessions held by the providers."""
        for w3 in self._w3.values():
            await w3.provider.disconnect()
        self._w3.clear()

    # ------------------------------------------------------------------ reads

    async def balance_of(self, address: str, network: EvmNetwork) -> int:
        """Token balance of ``address`` in atomic units."""
        fn = self._token(network).functions.balanceOf(to_checksum_address(address))
        return int(await self._rpc(network, fn.call))

    async def authorization_used(self, from_: str, nonce: str, network: EvmNetwork) -> bool:
        """Whether ``(from_, nonce)`` was already used or canceled on-chain.

        For crash recovery: an authorization that is used but not credited was settled.
        """
        fn = self._token(network).functions.authorizationState(to_checksum_address(from_),
                                                                HexBytes(nonce))
        return bool(await self._rpc(network, fn.call))

    async def transaction_status(self, tx_hash: str, network: EvmNetwork) -> TransactionStatus:
        """Receipt state of ``tx_hash``: unknown, pending, success or reverted."""
        eth = self.web3(network).eth
        try:
            receipt = await self._rpc(network, lambda: eth.get_transaction_receipt(
                HexBytes(tx_hash)))
        except TransactionNotFound:
            try:
                await self._rpc(network, lambda: eth.get_transaction(HexBytes(tx_hash)))
            except TransactionNotFound:
                return TransactionStatus("unknown")
            return TransactionStatus("pending")
        head = await self._rpc(network, lambda: eth.block_number)
        block = int(receipt["blockNumber"])
        return TransactionStatus("success" if receipt["status"] == 1 else "reverted",
                                 block_number=block, confirmations=int(head) - block + 1)

    # ------------------------------------------------------------------ verify

    async def verify(self, auth: Eip3009Authorization, *, pay_to: str, amount: int,
                     network: EvmNetwork) -> None:
        """Check ``auth`` pays exactly ``amount`` to ``pay_to`` and would settle now.

        Order: recipient, value, validAfter, validBefore (+margin), signature, nonce unused,
        balance. Raises :class:`PaymentRejected` with the x402 code of the first failure.
        """
        if to_checksum_address(auth.to) != to_checksum_address(pay_to):
            raise PaymentRejected("authorization.to is not the payTo address",
                                  code=ERR_RECIPIENT_MISMATCH)
        if auth.value != amount:
            raise PaymentRejected(f"authorization.value {auth.value} != required {amount}",
                                  code=ERR_VALUE_MISMATCH)
        now = int(self._clock())
        if auth.valid_after > now:
            raise PaymentRejected("authorization is not yet valid", code=ERR_VALID_AFTER)
        if auth.valid_before <= now + self.valid_before_margin:
            raise PaymentRejected("authorization is expired or expires too soon",
                                  code=ERR_VALID_BEFORE)
        signer = recover_signer(auth, network)
        if signer is None or signer != auth.payer:
            raise PaymentRejected("signature does not recover authorization.from",
                                  code=ERR_SIGNATURE)
        if await self.authorization_used(auth.from_, auth.nonce, network):
            raise PaymentRejected("authorization nonce already used", code=ERR_NONCE_USED)
        if await self.balance_of(auth.from_, network) < auth.value:
            raise PaymentRejected("payer balance is below the authorized value",
                                  code=ERR_INSUFFICIENT_BALANCE)

    # ------------------------------------------------------------------ settle

    def _call(self, auth: Eip3009Authorization, network: EvmNetwork) -> Any:
        v, r, s = auth.vrs()
        return self._token(network).functions.transferWithAuthorization(
            to_checksum_address(auth.from_), to_checksum_address(auth.to), auth.value,
            auth.valid_after, auth.valid_before, HexBytes(auth.nonce), v, r, s)

    async def settle(self, auth: Eip3009Authorization, network: EvmNetwork) -> SettlementResult:
        """Submit ``transferWithAuthorization`` from the relayer and wait for the receipt.

        Simulates first (eth_estimateGas) so a doomed authorization costs no gas; a revert
        maps to the x402 code of its revert string. Waits for ``network.confirmations``
        blocks, then requires status 1 and a ``Transfer(from, to, value)`` log from the token.
        """
        w3 = self.web3(network)
        relayer = to_checksum_address(network.relayer_address)
        fn = self._call(auth, network)
        try:
            gas = await self._rpc(network, lambda: fn.estimate_gas({"from": relayer}))
        except ContractLogicError as exc:
            message = str(exc.message or exc)
            raise PaymentRejected(f"settlement simulation reverted: {message}",
                                  code=revert_code(message)) from exc
        lock = self._locks.setdefault((network.rpc_url, relayer), asyncio.Lock())
        async with lock:
            # Nonce allocation and broadcast happen under one lock: the pending count only
            # includes our previous transaction once the node has accepted it.
            nonce = await self._rpc(network, lambda: w3.eth.get_transaction_count(
                relayer, "pending"))
            gas_price = await self._rpc(network, lambda: w3.eth.gas_price)
            tx = await fn.build_transaction({
                "from": relayer, "nonce": nonce, "gas": int(gas * 5 // 4),
                "gasPrice": gas_price, "chainId": network.chain_id,
            })
            signed = Account.sign_transaction(tx, network.relayer_secret())
            try:
                tx_hash = await self._rpc(network, lambda: w3.eth.send_raw_transaction(
                    signed.raw_transaction))
            except ContractLogicError as exc:
                message = str(exc.message or exc)
                raise PaymentRejected(f"settlement rejected: {message}",
                                      code=revert_code(message, ERR_TRANSACTION_STATE)) from exc
        receipt = await self._wait_receipt(tx_hash, network)
        if receipt["status"] != 1:
            raise PaymentRejected(f"settlement transaction {tx_hash.to_0x_hex()} reverted",
                                  code=await self._explain_revert(auth, network),
                                  extra={"transaction": tx_hash.to_0x_hex()})
        if not _has_transfer_log(receipt, auth, network):
            raise PaymentRejected("settlement receipt lacks the Transfer event",
                                  code=ERR_TRANSFER_EVENT_MISMATCH,
                                  extra={"transaction": tx_hash.to_0x_hex()})
        return SettlementResult(tx_hash=tx_hash.to_0x_hex(), payer=auth.payer, amount=auth.value,
                                block_number=int(receipt["blockNumber"]),
                                network=network.network)

    async def _wait_receipt(self, tx_hash: HexBytes, network: EvmNetwork) -> Any:
        eth = self.web3(network).eth
        deadline = time.monotonic() + network.receipt_timeout
        while True:
            try:
                receipt = await self._rpc(network, lambda: eth.get_transaction_receipt(tx_hash))
            except TransactionNotFound:
                receipt = None
            if receipt is not None and receipt.get("blockNumber") is not None:
                head = await self._rpc(network, lambda: eth.block_number)
                if int(head) - int(receipt["blockNumber"]) + 1 >= network.confirmations:
                    return receipt
            if time.monotonic() > deadline:
                # The transaction may still land: the caller must reconcile via
                # transaction_status / authorization_used before crediting or retrying.
                raise ServiceUnavailable(
                    f"no receipt for {tx_hash.to_0x_hex()} after {network.receipt_timeout}s",
                    extra={"transaction": tx_hash.to_0x_hex()})
            await asyncio.sleep(self._poll)

    async def _explain_revert(self, auth: Eip3009Authorization, network: EvmNetwork) -> str:
        """Best-effort code for a mined revert (e.g. a concurrent settle of the same nonce)."""
        if await self.authorization_used(auth.from_, auth.nonce, network):
            return ERR_NONCE_USED
        if await self.balance_of(auth.from_, network) < auth.value:
            return ERR_INSUFFICIENT_BALANCE
        if auth.valid_before <= int(self._clock()):
            return ERR_VALID_BEFORE
        return ERR_TRANSACTION_STATE


def _has_transfer_log(receipt: Any, auth: Eip3009Authorization, network: EvmNetwork) -> bool:
    token = to_checksum_address(network.asset)
    want = (_topic_address(auth.from_), _topic_address(auth.to))
    for log in receipt.get("logs", []):
        topics = [HexBytes(t).to_0x_hex() for t in log.get("topics", [])]
        if (to_checksum_address(log["address"]) == token and len(topics) == 3
                and topics[0] == TRANSFER_TOPIC and (topics[1], topics[2]) == want
                and int.from_bytes(HexBytes(log["data"]), "big") == auth.value):
            return True
    return False


def _topic_address(address: str) -> str:
    return "0x" + "00" * 12 + address.lower()[2:]


__all__ = [
    "EIP3009_ABI",
    "ERR_INSUFFICIENT_BALANCE",
    "ERR_NONCE_USED",
    "ERR_RECIPIENT_MISMATCH",
    "ERR_SIGNATURE",
    "ERR_SIMULATION_FAILED",
    "ERR_TRANSACTION_STATE",
    "ERR_TRANSFER_EVENT_MISMATCH",
    "ERR_VALID_AFTER",
    "ERR_VALID_BEFORE",
    "ERR_VALUE_MISMATCH",
    "Eip3009Authorization",
    "EvmNetwork",
    "EvmSettler",
    "SettlementResult",
    "TransactionStatus",
    "recover_signer",
    "revert_code",
    "sign_authorization",
    "typed_data",
]
