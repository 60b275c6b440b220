"""Payment rail settings: ``[x402]`` (with its ``[x402.networks.<name>]`` chains), ``[mpp]``
and ``[stripe]``. Part of the one settings object (:mod:`gateway.settings`), kept apart because each
rail's keys and checks grow with the rail."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


X402_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"network": "eip155:8453", "chain_id": 8453,
             "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
             "token_name": "USD Coin", "token_version": "2"},
    "base-sepolia": {"network": "eip155:84532", "chain_id": 84532,
                     "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                     "token_name": "USDC", "token_version": "2"},
    "local": {"network": "eip155:31337", "chain_id": 31337, "rpc_url": "http://127.0.0.1:8545",
              "token_name": "USD Coin", "token_version": "2"},
}


class X402NetworkSettings(_Frozen):
    """One chain and token agents may pay deposits on."""

    preset: Literal["base", "base-sepolia", "local"] | None = None
    network: str = ""
    chain_id: int = 0
    rpc_url: str = ""
    asset: str = ""
    token_name: str = ""
    token_version: str = "2"
    confirmations: int = Field(default=1, ge=1)
    #: One RPC call, and the wait for a settlement's receipt, before giving up (503).
    rpc_timeout_seconds: float = Field(default=10.0, gt=0)
    receipt_timeout_seconds: float = Field(default=120.0, gt=0)
    relayer_key: SecretStr | None = None
    relayer_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in X402_PRESETS:
            return {**X402_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> X402NetworkSettings:
        for name in ("network", "rpc_url", "asset", "token_name"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (or a preset that sets it)")
        if not self.network.startswith("eip155:") or self.chain_id <= 0:
            raise ValueError("network must be CAIP-2 eip155:<chain id> with a chain_id")
        return self

    def relayer(self) -> str | None:
        """The relayer's private key: explicit value first, else the named variable."""
        if self.relayer_key is not None:
            return self.relayer_key.get_secret_value()
        return os.environ.get(self.relayer_key_env) if self.relayer_key_env else None


class X402UptoSettings(_Frozen):
    """``[x402.upto]``: the ``upto`` scheme (a Permit2 authorization for a maximum, settled
    once for what the request used). Needs the canonical Permit2 and x402 upto proxy on the
    chain. The payer's authorization names the one facilitator that may settle it: in local
    mode our relayer, in remote mode the address the facilitator's ``/supported`` announces
    (``extra.facilitatorAddress``)."""

    enabled: bool = False
    #: The most one request may authorize (asset units): a 402 asks for the prompt plus
    #: ``max_tokens`` at the model's price, capped here; the stream is cut at what was
    #: authorized.
    max: str = "5.00"
    #: ``maxTimeoutSeconds`` of the offer: the SDK's client signs a deadline this far ahead;
    #: a stream must end (and settle) before it.
    timeout_seconds: int = Field(default=900, ge=60)
    #: An authorization no stream holds money on for this long is settled by the keeper
    #: (a request that failed, or whose process died).
    idle_seconds: float = Field(default=30.0, gt=0)
    sweep_seconds: float = Field(default=5.0, gt=0)
    #: Settle this long before an authorization's deadline (a stream still running then is
    #: cut at the end of its lease); a payment whose deadline is nearer is refused.
    deadline_margin_seconds: float = Field(default=30.0, ge=1)


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
FACILITATOR_ENDPOINTS = ("verify", "settle", "supported")


class X402FacilitatorSettings(_Frozen):
    """``[x402.facilitator]``: how remote mode talks to the facilitator at
    ``facilitator_url``. Header values are secrets (hosted facilitators authenticate with
    them): the settings name the environment variable holding each value, never the value,
    so nothing secret is in the file, the printed configuration or a log."""

    #: Header name -> environment variable holding its value, sent to every endpoint.
    headers_env: dict[str, str] = {}
    #: Per endpoint, over ``headers_env``: ``/verify``, ``/settle``, ``/supported``.
    verify_headers_env: dict[str, str] = {}
    settle_headers_env: dict[str, str] = {}
    supported_headers_env: dict[str, str] = {}
    #: A ``/settle`` answered ``settlement_pending`` (sent, not confirmed yet) is sent again
    #: up to this many times, this far apart; still pending after that, the deposit stays
    #: open (503 now, reconciled on-chain at the next start), never refused.
    settle_pending_retries: int = Field(default=3, ge=0, le=20)
    settle_pending_delay_seconds: float = Field(default=2.0, ge=0, le=60)
    #: Redirects followed per call (configured headers only go to the configured origin).
    max_redirects: int = Field(default=5, ge=0, le=20)

    @model_validator(mode="after")
    def _check_names(self) -> X402FacilitatorSettings:
        for field, table in self._tables().items():
            for header, env in table.items():
                if not _HEADER_NAME.fullmatch(header):
                    raise ValueError(f"{field}: {header[:60]!r} is not an HTTP header name")
                if not env.strip():
                    raise ValueError(f"{field}.{header} must name an environment variable")
        return self

    def _tables(self) -> dict[str, dict[str, str]]:
        return {"headers_env": self.headers_env,
                "verify_headers_env": self.verify_headers_env,
                "settle_headers_env": self.settle_headers_env,
                "supported_headers_env": self.supported_headers_env}

    def missing_env(self) -> list[str]:
        """The variables named for headers that are unset or empty."""
        names = {env for table in self._tables().values() for env in table.values()}
        return sorted(env for env in names if not os.environ.get(env))

    def endpoint_headers(self) -> dict[str, dict[str, str]]:
        """Per endpoint (``verify``, ``settle``, ``supported``), the headers to send, values
        read from the environment now. Secrets: never log what this returns."""
        return {endpoint: {header: os.environ.get(env, "")
                           for header, env in {**self.headers_env,
                                               **getattr(self, f"{endpoint}_headers_env")
                                               }.items()}
                for endpoint in FACILITATOR_ENDPOINTS}


class X402Settings(_Frozen):
    """The x402 deposit rail (off unless ``enabled``)."""

    enabled: bool = False
    mode: Literal["local", "remote"] = "local"
    facilitator_url: str | None = None
    facilitator_timeout_seconds: float = Field(default=30.0, gt=0)
    facilitator: X402FacilitatorSettings = X402FacilitatorSettings()
    pay_to: str = ""
    deposit: str = "1.00"
    #: The largest deposit one payment may make: a payer may pay more than a 402 asked (the
    #: amount asked depends on the request), up to this.
    max_deposit: str = "100.00"
    min_output_tokens: int = Field(default=256, ge=1)
    max_timeout_seconds: int = Field(default=300, ge=10)
    #: Every x402 payment answers with a new API key for the payer's account (keys are
    #: stored hashed: an earlier one cannot be shown again). An account keeps at most this
    #: many keys issued by payments, the oldest revoked when a payment issues one more...
    api_keys_kept: int = Field(default=5, ge=1, le=100)
    #: ...and a key issued by a payment expires after this long unused (every use restarts
    #: the clock). Keys an operator created are not affected by either.
    api_key_idle_seconds: int = Field(default=30 * 86400, ge=60)
    networks: dict[str, X402NetworkSettings] = {}
    upto: X402UptoSettings = X402UptoSettings()
    #: How often each process looks for deposits requests left between claim and credit
    #: (a settlement not confirmed in time, a process that died) and finishes them with the
    #: chain's answer (gateway/rails/x402_recovery.py).
    recovery_interval_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> X402Settings:
        if not self.enabled:
            return self
        if not (self.pay_to.startswith("0x") and len(self.pay_to) == 42):
            raise ValueError("pay_to must be the 0x address deposits are paid to")
        if not self.networks:
            raise ValueError("at least one network is required when x402 is enabled")
        if self.mode == "remote" and not self.facilitator_url:
            raise ValueError("facilitator_url is required in remote mode")
        if self.mode == "remote" and self.facilitator.missing_env():
            raise ValueError("facilitator headers: the variables "
                             f"{', '.join(self.facilitator.missing_env())} must be set")
        if self.mode == "local":
            for name, net in self.networks.items():
                if not net.relayer():
                    raise ValueError(f"networks.{name} needs relayer_key or relayer_key_env "
                                     "in local mode (the relayer pays the settlement gas)")
        return self


class MppSettings(_Frozen):
    """The Machine Payments Protocol rail: the ``Payment`` HTTP auth scheme, method ``evm``
    (off unless ``enabled``). Its challenges are HMAC-bound with the secrets in ``secret``
    / ``secret_env`` (comma-separated, at least 16 bytes each; the first signs, all verify:
    rotate by prepending a new one)."""

    enabled: bool = False
    realm: str = Field(default="tollstream", min_length=1)
    secret: SecretStr | None = None
    secret_env: str = "TOLLSTREAM_MPP_SECRET"
    challenge_ttl_seconds: int = Field(default=300, ge=10)
    #: Offer the one-time ``charge`` intent (an EIP-3009 payment credited as a balance).
    charge: bool = True
    pay_to: str = ""
    deposit: str = "1.00"
    min_output_tokens: int = Field(default=256, ge=1)
    #: The chain and token (same keys as an [x402.networks.<name>] entry).
    network: X402NetworkSettings | None = None
    #: Offer the ``session`` intent: an escrow channel spent with cumulative vouchers.
    session: bool = False
    escrow: str = ""
    #: The payee (the challenges' ``recipient``): its key settles and closes channels and
    #: pays their gas. Unset: the network's relayer key.
    payee_key_env: str | None = None
    suggested_deposit: str = "1.00"
    min_deposit: str = "0.01"
    min_voucher_delta: str = "0"
    settle_interval_seconds: float = Field(default=30.0, gt=0)
    #: Settle a channel once this much was spent beyond what the chain settled.
    settle_threshold: str = "0.10"
    #: How long a session stream whose vouchers ran out waits, paused, for the next voucher
    #: (``payment-need-voucher``) before it ends, billed what was delivered.
    session_pause_timeout_seconds: float = Field(default=60.0, gt=0)

    def payee_key(self) -> str | None:
        if self.payee_key_env:
            return os.environ.get(self.payee_key_env)
        return self.network.relayer() if self.network is not None else None

    def secrets(self) -> list[bytes]:
        """The challenge secrets, newest (signing) first."""
        raw = self.secret.get_secret_value() if self.secret is not None \
            else os.environ.get(self.secret_env, "")
        return [part.strip().encode() for part in raw.split(",") if part.strip()]

    @model_validator(mode="after")
    def _check(self) -> MppSettings:
        if not self.enabled:
            return self
        secrets = self.secrets()
        if not secrets or any(len(s) < 16 for s in secrets):
            raise ValueError(f"secret (or the variable {self.secret_env}) must hold one or "
                             "more comma-separated secrets of at least 16 characters")
        if self.network is None and (self.charge or self.session):
            raise ValueError("network is required for the evm charge and session (set "
                             "charge = false and session = false for a Stripe-only rail)")
        if self.network is None:
            return self
        if self.charge:
            if not (self.pay_to.startswith("0x") and len(self.pay_to) == 42):
                raise ValueError("pay_to must be the 0x address charges are paid to")
            if not self.network.relayer():
                raise ValueError("network needs relayer_key or relayer_key_env (the relayer "
                                 "pays the settlement gas)")
        if self.session:
            if not (self.escrow.startswith("0x") and len(self.escrow) == 42):
                raise ValueError("escrow must be the 0x address of the channel escrow")
            if not self.network.relayer():
                raise ValueError("network needs relayer_key or relayer_key_env (it relays "
                                 "openWithAuthorization and pays its gas)")
            if not self.payee_key():
                raise ValueError("payee_key_env names no key (the payee settles channels)")
        return self


class StripeSettings(_Frozen):
    """MPP's ``stripe`` charge (specs/mpp/draft-stripe-charge-00.md): an agent pays with a
    Stripe Shared Payment Token; the gateway confirms a PaymentIntent with it and credits a
    balance in ``currency`` (its minor units, never mixed with the asset's). Needs ``[mpp]``
    enabled (its realm and challenge secrets). The secret key is read from the environment
    variable ``secret_key_env`` and never logged."""

    enabled: bool = False
    #: Offer the SPT charge in 402s (needs ``[mpp]``); off: only usage is reported.
    charge: bool = True
    secret_key_env: str = "TOLLSTREAM_STRIPE_SECRET_KEY"
    #: Stripe's API base address (tests point it at a local Stripe-compatible server).
    api_base: str = "https://api.stripe.com"
    timeout_seconds: float = Field(default=20.0, gt=0)
    #: The seller's Stripe Business Network profile (``methodDetails.networkId``).
    network_id: str = ""
    payment_method_types: list[str] = ["card"]
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    #: Digits of the currency's minor unit (2 for usd and eur, 0 for jpy).
    decimals: int = Field(default=2, ge=0, le=4)
    #: Currency units per unit of the gateway's asset: model prices (asset units per million
    #: tokens) convert at this rate, rounded up to a whole minor unit per million tokens.
    per_asset_unit: str = "1.00"
    #: What one payment buys, in currency units (more when a request needs more).
    credit: str = "5.00"
    #: ``automatic``: a charge, credited at once. ``manual``: a hold, authorized up to the
    #: credit, metered, then captured for exactly what was spent (needs the Stripe account's
    #: SPT capabilities to allow manual capture).
    capture: Literal["automatic", "manual"] = "automatic"
    #: A hold is closed (captured, or cancelled if nothing was spent) after this long without
    #: spending, or this long after it was authorized (before the authorization lapses).
    hold_idle_seconds: float = Field(default=900.0, gt=0)
    hold_max_seconds: float = Field(default=6 * 86400.0, gt=0)
    hold_sweep_seconds: float = Field(default=30.0, gt=0)
    #: Report every finished request of an account that has a Stripe customer as a billing
    #: meter event of this name (value: the tokens billed); empty: off.
    meter_event_name: str = ""
    meter_events_interval_seconds: float = Field(default=2.0, gt=0)

    def secret_key(self) -> str | None:
        return os.environ.get(self.secret_key_env) or None

    @model_validator(mode="after")
    def _check(self) -> StripeSettings:
        if not self.enabled:
            return self
        if not self.secret_key():
            raise ValueError(f"the variable {self.secret_key_env} must hold the Stripe secret "
                             "key (secret_key_env names another variable)")
        if self.charge and not self.network_id:
            raise ValueError("network_id (the Stripe Business Network profile) is required")
        if not self.payment_method_types:
            raise ValueError("payment_method_types must name at least one type")
        return self

