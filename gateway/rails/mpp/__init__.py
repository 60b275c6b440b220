"""MPP (Machine Payments Protocol) rails: the ``session`` intent on EVM chains.

Specification: ``draft-evm-session-00`` (a payment channel in an on-chain escrow, paid by
cumulative EIP-712 vouchers). :mod:`~gateway.rails.mpp.channel` holds what needs no chain (the
channel's state, its id, vouchers and deposit authorizations, signing and recovery);
:mod:`~gateway.rails.mpp.escrow` drives the escrow contract (``gateway/chain/Escrow.vy``);
:mod:`~gateway.rails.mpp.outcomes` says what its reverts and events mean.
"""
