"""Building the MPP rail from its settings: the ``evm`` charge (on the x402 rail's deposit
engine when it serves the same network), the ``evm`` session with its settler, and the
``stripe`` charge with its holds, each when enabled."""

from __future__ import annotations

from gateway.rail_settings import X402Settings
from gateway.rails.mpp.charge import EvmCharge
from gateway.rails.mpp.escrow import EscrowClient
from gateway.rails.mpp.rail import MppRail
from gateway.rails.mpp.scheme import ChallengeSigner
from gateway.rails.mpp.session import EvmSession
from gateway.rails.mpp.settler import ChannelSettler
from gateway.rails.stripe.charge import StripeCharge
from gateway.rails.stripe.client import StripeApi
from gateway.rails.stripe.holds import HoldKeeper
from gateway.rails.x402_deposits import X402Deposits, evm_network
from gateway.settings import Settings
from meters.ledger import Ledger


def create_mpp_rail(settings: Settings, ledger: Ledger,
                    x402: X402Deposits | None = None) -> MppRail:
    """The MPP rail ``settings.mpp`` describes. Payments are taken by the x402 rail's deposit
    engine when it serves the same network (one engine per deposit store: its recovery must
    not run twice), else by an engine of its own."""
    cfg = settings.mpp
    asset = settings.asset_obj()
    charge = None
    owned = False
    if cfg.charge:
        assert cfg.network is not None  # the settings refuse an evm charge without one
        network_id = cfg.network.network
        if x402 is not None and network_id in x402.networks:
            engine = x402
        else:
            engine = X402Deposits(settings.model_copy(update={"x402": X402Settings(
                enabled=True, pay_to=cfg.pay_to, deposit=cfg.deposit,
                networks={"mpp": cfg.network})}), ledger)
            owned = True
        charge = EvmCharge(engine=engine, network=engine.networks[network_id],
                           pay_to=cfg.pay_to, deposit=asset.parse(cfg.deposit,
                                                                  field="mpp.deposit"),
                           asset=asset, ledger=ledger,
                           max_timeout_seconds=cfg.challenge_ttl_seconds)
    session = settler = None
    if cfg.session:
        payee_key = cfg.payee_key()
        assert cfg.network is not None and payee_key is not None  # the settings refuse it
        network = evm_network(cfg.network)
        escrow = EscrowClient(network, cfg.escrow)
        parse = asset.parse
        session = EvmSession(escrow=escrow, ledger=ledger, network=network,
                             payee_key=payee_key, asset=asset,
                             suggested_deposit=parse(cfg.suggested_deposit,
                                                     field="mpp.suggested_deposit"),
                             min_deposit=parse(cfg.min_deposit, field="mpp.min_deposit"),
                             min_voucher_delta=parse(cfg.min_voucher_delta,
                                                     field="mpp.min_voucher_delta"),
                             pause_timeout=cfg.session_pause_timeout_seconds)
        settler = ChannelSettler(escrow=escrow, channels=session.channels, ledger=ledger,
                                 payee_key=payee_key, interval=cfg.settle_interval_seconds,
                                 threshold=parse(cfg.settle_threshold,
                                                 field="mpp.settle_threshold"))
    stripe = None
    fiat = settings.fiat_asset()
    if fiat is not None and settings.stripe.charge:
        stripe_cfg = settings.stripe
        secret = stripe_cfg.secret_key()
        assert secret is not None  # the settings refuse stripe without one
        api = StripeApi(secret, api_base=stripe_cfg.api_base,
                        timeout=stripe_cfg.timeout_seconds)
        holds = HoldKeeper(api=api, ledger=ledger, idle_seconds=stripe_cfg.hold_idle_seconds,
                           max_seconds=stripe_cfg.hold_max_seconds,
                           interval=stripe_cfg.hold_sweep_seconds) \
            if stripe_cfg.capture == "manual" else None
        stripe = StripeCharge(
            api=api, ledger=ledger, currency=fiat,
            credit=fiat.parse(stripe_cfg.credit, field="stripe.credit"),
            conversion=settings.fiat_conversion(), network_id=stripe_cfg.network_id,
            payment_method_types=stripe_cfg.payment_method_types, holds=holds)
    return MppRail(realm=cfg.realm, ledger=ledger, charge=charge, owns_engine=owned,
                   session=session, settler=settler, stripe=stripe,
                   signer=ChallengeSigner(cfg.secrets(), ttl_seconds=cfg.challenge_ttl_seconds),
                   min_output_tokens=cfg.min_output_tokens)
