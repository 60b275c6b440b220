# pragma version 0.4.3
"""
@title Escrow
@notice Payment-channel escrow for the MPP "session" intent on EVM chains, written from
        draft-evm-session-00, section "Channel Escrow Contract" (Channel State, Channel
        Lifecycle, Contract Functions, Access Control, Signature Verification, Contract
        Errors) and the Voucher Signing Format. Any well-behaved ERC-20 token may back a
        channel (the channel records its token); the relayed EIP-3009 paths need the token's
        USDC v2.2 `bytes signature` overload of receiveWithAuthorization.

        Implemented: the mandatory core (open, settle, topUp, close, requestClose, withdraw)
        and the EIP-3009 part of the Relayed / Gasless Operations profile
        (openWithAuthorization, topUpWithAuthorization). Not implemented (the profile lets an
        implementation omit any subset): openWithPermit2, topUpWithPermit2 (no Permit2 on our
        chains yet), settleWithAuthorization, closeWithAuthorization. A server must not
        advertise what is missing.

        Departures from the spec, on purpose:
        * Errors ("Contract Errors"): Vyper 0.4 has no custom errors. Every revert this
          contract raises itself is Error(string) whose string is exactly the spec's
          suggested error name ("ChannelNotFound", "NotPayee", ...), which the section allows
          ("MAY use different names or revert representations"). Added names: InvalidPayee,
          InvalidPayer (a zero payee or payer), TransferFailed (the token did not move
          exactly the amount), GracePeriodTooShort (constructor). A uint128 argument above
          2^128 - 1 fails ABI decoding and reverts without data.
        * Events: the EVM draft lists none; these are the ones of the Tempo escrow interface
          (draft-tempo-session-00, "Legacy Contract Reference Implementation"), which the EVM
          draft adapts, with the same names and fields.
"""

from ethereum.ercs import IERC20


interface IERC3009:
    # USDC v2.2's packed-signature overload (spec: "openWithAuthorization", Note).
    def receiveWithAuthorization(
        _from: address,
        _to: address,
        _value: uint256,
        _validAfter: uint256,
        _validBefore: uint256,
        _nonce: bytes32,
        _signature: Bytes[65],
    ): nonpayable


struct Channel:
    payer: address
    payee: address
    token: address
    authorizedSigner: address
    deposit: uint128
    settled: uint128
    closeRequestedAt: uint64
    finalized: bool


event ChannelOpened:
    channelId: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    token: address
    authorizedSigner: address
    deposit: uint256

event Settled:
    channelId: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    cumulativeAmount: uint256
    deltaPaid: uint256
    newSettled: uint256

event CloseRequested:
    channelId: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    closeGraceEnd: uint256

event CloseRequestCancelled:
    channelId: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)

event TopUp:
    channelId: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    additionalDeposit: uint256
    newDeposit: uint256

# settledToPayee is the channel's final cumulative settlement (everything the payee got over
# the channel's life), refundedToPayer what this transaction refunded: they sum to the deposit.
event ChannelClosed:
    channelId: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    settledToPayee: uint256
    refundedToPayer: uint256


VOUCHER_TYPEHASH: public(constant(bytes32)) = keccak256(
    "Voucher(bytes32 channelId,uint128 cumulativeAmount)"
)
EIP712_DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("EVM Payment Channel")
DOMAIN_VERSION_HASH: constant(bytes32) = keccak256("1")
# secp256k1 order n, and n / 2 (spec: Signature Verification, 1): a larger s is the malleable
# twin of a valid signature and is refused; r must lie in [1, n).
SECP256K1_N: constant(uint256) = 115792089237316195423570985008687907852837564279074904382605163141518161494337
SECP256K1N_HALF: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168
ERC1271_MAGIC: constant(bytes4) = 0x1626ba7e
# Forced Close: "MUST NOT use a grace period shorter than 10 minutes".
MIN_CLOSE_GRACE_PERIOD: public(constant(uint64)) = 600
# Seconds between requestClose and the earliest withdraw. Fixed at deployment (the reference
# value is 900): a constant for the contract's whole life, as the spec's CLOSE_GRACE_PERIOD.
CLOSE_GRACE_PERIOD: public(immutable(uint64))

# Never deleted: a finalized record keeps its channelId from being opened again, which would
# let old vouchers (same digest) be replayed against a new deposit (spec: Channel Re-Use).
_channels: HashMap[bytes32, Channel]


@deploy
def __init__(close_grace_period: uint64):
    assert close_grace_period >= MIN_CLOSE_GRACE_PERIOD, "GracePeriodTooShort"
    CLOSE_GRACE_PERIOD = close_grace_period


# ------------------------------------------------------------------------------ views


@view
@external
def getChannel(channelId: bytes32) -> Channel:
    """
    @notice The channel's record; all zero (payer == 0) when no such channel was opened.
    """
    return self._channels[channelId]


@view
@external
def computeChannelId(
    payer: address, payee: address, token: address, salt: bytes32, authorizedSigner: address
) -> bytes32:
    """
    @notice keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, this escrow,
            chain id)), as open computes it.
    """
    return self._channel_id(payer, payee, token, salt, authorizedSigner)


@view
@external
def domainSeparator() -> bytes32:
    return self._domain_separator()


@view
@external
def getVoucherDigest(channelId: bytes32, cumulativeAmount: uint128) -> bytes32:
    """
    @notice The EIP-712 digest a voucher for (channelId, cumulativeAmount) signs.
    """
    return self._voucher_digest(channelId, cumulativeAmount)


@view
@internal
def _channel_id(
    payer: address, payee: address, token: address, salt: bytes32, authorizedSigner: address
) -> bytes32:
    return keccak256(abi_encode(payer, payee, token, salt, authorizedSigner, self, chain.id))


@view
@internal
def _domain_separator() -> bytes32:
    # Per call, so the domain follows chain.id after a fork (spec: Cross-Chain Replay).
    return keccak256(abi_encode(
        EIP712_DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, chain.id, self
    ))


@view
@internal
def _voucher_digest(channelId: bytes32, cumulativeAmount: uint128) -> bytes32:
    struct_hash: bytes32 = keccak256(abi_encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount))
    return keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))


@view
@internal
def _ecdsa_signer(digest: bytes32, signature: Bytes[65]) -> address:
    """
    @dev The signer of a canonical 65-byte r || s || v signature, or the zero address for
         anything else: another length (EIP-2098 compact form not accepted), v not 27/28,
         r or s out of range, high s, or no recoverable key.
    """
    if len(signature) != 65:
        return empty(address)
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    if v != 27 and v != 28:
        return empty(address)
    if r == 0 or r >= SECP256K1_N or s == 0 or s > SECP256K1N_HALF:
        return empty(address)
    return ecrecover(digest, v, r, s)


@view
@internal
def _valid_voucher(
    channel: Channel, channelId: bytes32, cumulativeAmount: uint128, signature: Bytes[65]
) -> bool:
    # Signature Verification, 2: authorizedSigner if set, else the payer; an EOA by ECDSA,
    # then (as OpenZeppelin's SignatureChecker) a contract wallet by ERC-1271.
    signer: address = channel.authorizedSigner
    if signer == empty(address):
        signer = channel.payer
    digest: bytes32 = self._voucher_digest(channelId, cumulativeAmount)
    recovered: address = self._ecdsa_signer(digest, signature)
    if recovered != empty(address) and recovered == signer:
        return True
    if not signer.is_contract:
        return False
    ok: bool = False
    answer: Bytes[32] = b""
    ok, answer = raw_call(
        signer,
        abi_encode(digest, signature, method_id=method_id("isValidSignature(bytes32,bytes)")),
        max_outsize=32,
        is_static_call=True,
        revert_on_failure=False,
    )
    # A wallet that reverts or answers anything else refuses: InvalidSignature, not its error.
    return ok and len(answer) == 32 and convert(slice(answer, 0, 4), bytes4) == ERC1271_MAGIC


# ------------------------------------------------------------------------------ internals


@view
@internal
def _live(channelId: bytes32) -> Channel:
    channel: Channel = self._channels[channelId]
    assert channel.payer != empty(address), "ChannelNotFound"
    assert not channel.finalized, "ChannelFinalized"
    return channel


@internal
def _open(
    payer: address,
    payee: address,
    token: address,
    deposit: uint128,
    salt: bytes32,
    authorizedSigner: address,
) -> bytes32:
    assert deposit != 0, "ZeroDeposit"
    assert payee != empty(address), "InvalidPayee"
    assert payer != empty(address), "InvalidPayer"
    channelId: bytes32 = self._channel_id(payer, payee, token, salt, authorizedSigner)
    # A finalized channel still exists here: no re-open (spec: Channel Re-Use).
    assert self._channels[channelId].payer == empty(address), "ChannelAlreadyExists"
    self._channels[channelId] = Channel(
        payer=payer,
        payee=payee,
        token=token,
        authorizedSigner=authorizedSigner,
        deposit=deposit,
        settled=0,
        closeRequestedAt=0,
        finalized=False,
    )
    log ChannelOpened(
        channelId=channelId,
        payer=payer,
        payee=payee,
        token=token,
        authorizedSigner=authorizedSigner,
        deposit=convert(deposit, uint256),
    )
    return channelId


@internal
def _add_deposit(channelId: bytes32, channel: Channel, amount: uint128, cancel_close: bool):
    assert amount != 0, "ZeroDeposit"
    total: uint256 = convert(channel.deposit, uint256) + convert(amount, uint256)
    assert total <= convert(max_value(uint128), uint256), "DepositOverflow"
    self._channels[channelId].deposit = convert(total, uint128)
    if cancel_close and channel.closeRequestedAt != 0:
        self._channels[channelId].closeRequestedAt = 0
        log CloseRequestCancelled(channelId=channelId, payer=channel.payer, payee=channel.payee)
    log TopUp(
        channelId=channelId,
        payer=channel.payer,
        payee=channel.payee,
        additionalDeposit=convert(amount, uint256),
        newDeposit=total,
    )


@internal
def _pull(token: address, payer: address, amount: uint128):
    # Deposits are recorded as the amount asked; a token that delivers less (fee on transfer)
    # would let the payee settle more than is held, so the balance must grow by exactly it.
    before: uint256 = staticcall IERC20(token).balanceOf(self)
    assert extcall IERC20(token).transferFrom(
        payer, self, convert(amount, uint256), default_return_value=True
    ), "TransferFailed"
    assert staticcall IERC20(token).balanceOf(self) == before + convert(amount, uint256), \
        "TransferFailed"


@internal
def _receive(
    token: address,
    _from: address,
    amount: uint128,
    validAfter: uint256,
    validBefore: uint256,
    nonce: bytes32,
    signature: Bytes[65],
):
    # receiveWithAuthorization, not transferWithAuthorization: the token requires
    # msg.sender == to, so a signature seen in the mempool cannot be used elsewhere.
    before: uint256 = staticcall IERC20(token).balanceOf(self)
    extcall IERC3009(token).receiveWithAuthorization(
        _from, self, convert(amount, uint256), validAfter, validBefore, nonce, signature
    )
    assert staticcall IERC20(token).balanceOf(self) == before + convert(amount, uint256), \
        "TransferFailed"


@internal
def _push(token: address, receiver: address, amount: uint128):
    if amount == 0:
        return
    assert extcall IERC20(token).transfer(
        receiver, convert(amount, uint256), default_return_value=True
    ), "TransferFailed"


# ------------------------------------------------------------------------------ opening


@external
@nonreentrant
def open(
    payee: address, token: address, deposit: uint128, salt: bytes32, authorizedSigner: address
) -> bytes32:
    """
    @notice Open a channel funded by the caller (prior approve(escrow, deposit) needed).
    """
    channelId: bytes32 = self._open(msg.sender, payee, token, deposit, salt, authorizedSigner)
    self._pull(token, msg.sender, deposit)
    return channelId


@external
@nonreentrant
def openWithAuthorization(
    payee: address,
    token: address,
    deposit: uint128,
    salt: bytes32,
    authorizedSigner: address,
    _from: address,
    validAfter: uint256,
    validBefore: uint256,
    nonce: bytes32,
    signature: Bytes[65],
) -> bytes32:
    """
    @notice Open a channel funded by `_from`'s EIP-3009 ReceiveWithAuthorization; anyone may
            submit. The nonce must be keccak256(abi.encode(from, payee, token, salt,
            authorizedSigner)) so a front-runner cannot change the channel's parameters.
    """
    expected: bytes32 = keccak256(abi_encode(_from, payee, token, salt, authorizedSigner))
    assert nonce == expected, "NonceMismatch"
    channelId: bytes32 = self._open(_from, payee, token, deposit, salt, authorizedSigner)
    self._receive(token, _from, deposit, validAfter, validBefore, nonce, signature)
    return channelId


# ------------------------------------------------------------------------------ deposits


@external
@nonreentrant
def topUp(channelId: bytes32, additionalDeposit: uint128):
    """
    @notice Add the payer's funds (prior approve needed); cancels a pending close request.
    """
    channel: Channel = self._live(channelId)
    assert msg.sender == channel.payer, "NotPayer"
    self._add_deposit(channelId, channel, additionalDeposit, True)
    self._pull(channel.token, msg.sender, additionalDeposit)


@external
@nonreentrant
def topUpWithAuthorization(
    channelId: bytes32,
    additionalDeposit: uint128,
    _from: address,
    topUpSalt: bytes32,
    validAfter: uint256,
    validBefore: uint256,
    nonce: bytes32,
    signature: Bytes[65],
):
    """
    @notice Add `_from`'s funds by EIP-3009; anyone may submit, `_from` need not be the
            payer (refunds still go to the payer). The nonce must be
            keccak256(abi.encode(channelId, additionalDeposit, from, topUpSalt)).
    """
    channel: Channel = self._live(channelId)
    expected: bytes32 = keccak256(abi_encode(channelId, additionalDeposit, _from, topUpSalt))
    assert nonce == expected, "NonceMismatch"
    # Only the payer's own top-up cancels a pending close: the spec requires it of topUp (payer
    # only); were any funder's top-up to cancel it, the payee could keep a forced close from
    # ever completing by topping up 1 unit before each grace period ends.
    self._add_deposit(channelId, channel, additionalDeposit, _from == channel.payer)
    self._receive(
        channel.token, _from, additionalDeposit, validAfter, validBefore, nonce, signature
    )


# ------------------------------------------------------------------------------ payee


@external
@nonreentrant
def settle(channelId: bytes32, cumulativeAmount: uint128, signature: Bytes[65]):
    """
    @notice Pay the payee the voucher's cumulative amount minus what was settled before.
    """
    channel: Channel = self._live(channelId)
    assert msg.sender == channel.payee, "NotPayee"
    assert cumulativeAmount > channel.settled, "AmountNotIncreasing"
    assert cumulativeAmount <= channel.deposit, "AmountExceedsDeposit"
    assert self._valid_voucher(channel, channelId, cumulativeAmount, signature), \
        "InvalidSignature"
    delta: uint128 = cumulativeAmount - channel.settled
    self._channels[channelId].settled = cumulativeAmount
    log Settled(
        channelId=channelId,
        payer=channel.payer,
        payee=channel.payee,
        cumulativeAmount=convert(cumulativeAmount, uint256),
        deltaPaid=convert(delta, uint256),
        newSettled=convert(cumulativeAmount, uint256),
    )
    self._push(channel.token, channel.payee, delta)


@external
@nonreentrant
def close(channelId: bytes32, cumulativeAmount: uint128, signature: Bytes[65]):
    """
    @notice Settle the final voucher, refund the rest to the payer, finalize. A
            cumulativeAmount <= settled forfeits the unsettled rest and needs no signature.
    """
    channel: Channel = self._live(channelId)
    assert msg.sender == channel.payee, "NotPayee"
    delta: uint128 = 0
    if cumulativeAmount > channel.settled:
        assert cumulativeAmount <= channel.deposit, "AmountExceedsDeposit"
        assert self._valid_voucher(channel, channelId, cumulativeAmount, signature), \
            "InvalidSignature"
        delta = cumulativeAmount - channel.settled
        self._channels[channelId].settled = cumulativeAmount
        log Settled(
            channelId=channelId,
            payer=channel.payer,
            payee=channel.payee,
            cumulativeAmount=convert(cumulativeAmount, uint256),
            deltaPaid=convert(delta, uint256),
            newSettled=convert(cumulativeAmount, uint256),
        )
    settled: uint128 = channel.settled + delta
    refund: uint128 = channel.deposit - settled
    self._channels[channelId].finalized = True
    log ChannelClosed(
        channelId=channelId,
        payer=channel.payer,
        payee=channel.payee,
        settledToPayee=convert(settled, uint256),
        refundedToPayer=convert(refund, uint256),
    )
    self._push(channel.token, channel.payee, delta)
    self._push(channel.token, channel.payer, refund)


# ------------------------------------------------------------------------------ payer


@external
@nonreentrant
def requestClose(channelId: bytes32):
    """
    @notice Start the grace period after which the payer may withdraw. Asking again while a
            request is pending changes nothing (the first request's clock keeps running).
    """
    channel: Channel = self._live(channelId)
    assert msg.sender == channel.payer, "NotPayer"
    if channel.closeRequestedAt != 0:
        return
    self._channels[channelId].closeRequestedAt = convert(block.timestamp, uint64)
    log CloseRequested(
        channelId=channelId,
        payer=channel.payer,
        payee=channel.payee,
        closeGraceEnd=block.timestamp + convert(CLOSE_GRACE_PERIOD, uint256),
    )


@external
@nonreentrant
def withdraw(channelId: bytes32):
    """
    @notice After the grace period, refund the unsettled deposit to the payer and finalize.
    """
    channel: Channel = self._live(channelId)
    assert msg.sender == channel.payer, "NotPayer"
    # Without the first check, 0 + grace <= now would let a payer skip requestClose.
    assert channel.closeRequestedAt != 0, "CloseNotReady"
    assert block.timestamp >= convert(channel.closeRequestedAt, uint256) + convert(
        CLOSE_GRACE_PERIOD, uint256
    ), "CloseNotReady"
    refund: uint128 = channel.deposit - channel.settled
    self._channels[channelId].finalized = True
    log ChannelClosed(
        channelId=channelId,
        payer=channel.payer,
        payee=channel.payee,
        settledToPayee=convert(channel.settled, uint256),
        refundedToPayer=convert(refund, uint256),
    )
    self._push(channel.token, channel.payer, refund)
