# pragma version 0.4.3
"""
@title X402UptoPermit2Proxy
@notice The x402UptoPermit2Proxy of the x402 `upto` scheme on EVM (scheme_upto_evm.md,
        section 1 "AssetTransferMethod: Permit2", Phase 4 "Settlement Logic", and the Annex
        "Reference Implementation"), for local dev chains: the spender in the payer's Permit2
        signature. The payer signs PermitWitnessTransferFrom for a maximum amount with the
        witness Witness(address to,address facilitator,uint256 validAfter); the facilitator
        named in the witness settles any amount up to that maximum, always to witness.to,
        once (Permit2's nonce), between witness.validAfter and the permit's deadline.
        `settle` has the ABI of the x402 SDK's X402_UPTO_PERMIT2_PROXY_ABI (same selector).

        Checks, in order: amount <= permit.permitted.amount (AmountExceedsPermitted),
        amount != 0 (InvalidAmount), owner != 0 (InvalidOwner), witness.to != 0
        (InvalidDestination), msg.sender == witness.facilitator (UnauthorizedFacilitator),
        block.timestamp >= witness.validAfter (PaymentTooEarly); then Permit2 checks the
        deadline (SignatureExpired), the nonce (InvalidNonce) and the signature
        (InvalidSignature) and moves the tokens (the token's own revert when the payer has
        not approved Permit2 or lacks the balance).

        The Permit2 address is the canonical constant: the dev chain places this contract's
        runtime code at 0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002, so nothing here is set by
        a constructor (the reference proxy stores PERMIT2 through an initialize call).

        Departures from the reference, on purpose:
        * Errors: Vyper 0.4 has no custom errors; each revert raised here is Error(string)
          whose string is the Solidity error name the x402 SDK's settle error mapper matches.
        * Omitted: settleWithPermit (the EIP-2612 path, scheme_upto_evm.md Option C /
          eip2612GasSponsoring): payers approve Permit2 directly (Option A). A facilitator
          must not advertise eip2612GasSponsoring against this proxy.
        * No reentrancy guard: the proxy keeps no state, Permit2 spends the nonce before the
          token is called, and the dev chain's tokens make no callbacks.
        * A zero amount reverts (InvalidAmount, as the reference) instead of spending the
          nonce: the spec settles 0 with no transaction.
"""


struct TokenPermissions:
    token: address
    amount: uint256

struct PermitTransferFrom:
    permitted: TokenPermissions
    nonce: uint256
    deadline: uint256

struct SignatureTransferDetails:
    to: address
    requestedAmount: uint256

struct Witness:
    to: address
    facilitator: address
    validAfter: uint256


interface IPermit2:
    def permitWitnessTransferFrom(
        permit: PermitTransferFrom,
        transferDetails: SignatureTransferDetails,
        owner: address,
        witness: bytes32,
        witnessTypeString: String[1024],
        signature: Bytes[65],
    ): nonpayable


event Settled:
    pass


# Uniswap's canonical Permit2 (the same address on every chain).
PERMIT2: public(constant(address)) = 0x000000000022D473030F116dDEE9F6B43aC78BA3
# The rest of Permit2's witness type string after its stub: the primary type closes with the
# witness member, then the referenced types in alphabetical order (EIP-712 encodeType).
WITNESS_TYPE_STRING: public(constant(String[120])) = "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)"
WITNESS_TYPEHASH: public(constant(bytes32)) = keccak256(
    "Witness(address to,address facilitator,uint256 validAfter)"
)


@external
def settle(
    permit: PermitTransferFrom,
    amount: uint256,
    owner: address,
    witness: Witness,
    signature: Bytes[65],
):
    """
    @notice Move `amount` (at most permit.permitted.amount) of the permitted token from
            `owner` to witness.to through Permit2. Only witness.facilitator may call.
    """
    assert amount <= permit.permitted.amount, "AmountExceedsPermitted"
    assert amount != 0, "InvalidAmount"
    assert owner != empty(address), "InvalidOwner"
    assert witness.to != empty(address), "InvalidDestination"
    assert msg.sender == witness.facilitator, "UnauthorizedFacilitator"
    assert block.timestamp >= witness.validAfter, "PaymentTooEarly"
    witness_hash: bytes32 = keccak256(abi_encode(
        WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter))
    extcall IPermit2(PERMIT2).permitWitnessTransferFrom(
        permit,
        SignatureTransferDetails(to=witness.to, requestedAmount=amount),
        owner,
        witness_hash,
        WITNESS_TYPE_STRING,
        signature,
    )
    log Settled()
