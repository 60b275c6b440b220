# pragma version 0.4.3
"""
@title Permit2
@notice The signature-transfer half of Uniswap's canonical Permit2 (ISignatureTransfer), for
        local dev chains: enough for the x402 `upto` scheme (scheme_upto_evm.md, section 1,
        "AssetTransferMethod: Permit2", and the Annex "Canonical Permit2"), whose
        x402UptoPermit2Proxy calls permitWitnessTransferFrom. Written from Permit2's published
        interface and semantics and the x402 SDK's EIP-712 types; the dev chain places its
        runtime code at the canonical address 0x000000000022D473030F116dDEE9F6B43aC78BA3, so
        it keeps no constructor-initialised state: the EIP-712 domain separator is computed
        from chain.id and self on every call.

        Implemented, with Permit2's ABI (same selectors): DOMAIN_SEPARATOR(),
        nonceBitmap(owner, wordPos), permitWitnessTransferFrom(permit, transferDetails,
        owner, witness, witnessTypeString, signature), permitTransferFrom(permit,
        transferDetails, owner, signature) and invalidateUnorderedNonces(wordPos, mask), with
        the UnorderedNonceInvalidation event. The EIP-712 domain is {name: "Permit2", chainId,
        verifyingContract}: no version field, as Permit2 and the SDK sign it.

        Semantics kept from Permit2's SignatureTransfer, in its order: deadline
        (block.timestamp > deadline: SignatureExpired), requestedAmount <= permitted.amount
        (InvalidAmount), the unordered nonce (word nonce >> 8, bit nonce & 255, spent by
        flipping the bit: a spent bit is InvalidNonce), the signature over the struct hash
        that binds msg.sender as the spender, then token.transferFrom(owner, to,
        requestedAmount) from Permit2's own allowance (the owner approves Permit2 on the
        token once). A token returning nothing counts as success, one returning false does
        not (TRANSFER_FROM_FAILED, solmate's SafeTransferLib message); a token's own revert
        is passed on.

        Departures from Permit2, on purpose:
        * Errors: Vyper 0.4 has no custom errors. Every revert raised here is Error(string)
          whose string is the Solidity error name (SignatureExpired, InvalidAmount,
          InvalidNonce, InvalidSignature, InvalidSignatureLength, InvalidContractSignature),
          without the arguments Permit2's errors carry. A recovered signer other than the
          owner is "InvalidSignature" (Permit2: InvalidSigner), which the x402 SDK's settle
          error mapper recognises.
        * Signatures: only the 65-byte r || s || v form (no EIP-2098 64-byte compact form:
          InvalidSignatureLength), v must be 27 or 28 and s in the lower half of the curve
          order (Permit2 accepts malleable high-s signatures; we refuse them: InvalidSignature).
          An owner with code is checked by ERC-1271 as Permit2 does, but with at most 65
          signature bytes (a longer `bytes` fails ABI decoding and reverts without data).
        * witnessTypeString is at most 1024 bytes (a longer one fails ABI decoding).
        * Not implemented: the batch transfers (permitTransferFrom / permitWitnessTransferFrom
          with arrays), the whole AllowanceTransfer half (approve, permit, transferFrom,
          lockdown, ordered nonces) and the Permit2 events other than
          UnorderedNonceInvalidation.
"""

from ethereum.ercs import IERC20


interface IERC1271:
    def isValidSignature(_hash: bytes32, _signature: Bytes[65]) -> bytes4: view


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


event UnorderedNonceInvalidation:
    owner: indexed(address)
    word: uint256
    mask: uint256


# owner => word position => bitmap of spent nonces (Permit2's unordered nonces).
nonceBitmap: public(HashMap[address, HashMap[uint256, uint256]])

MAX_WITNESS_TYPE_STRING: constant(uint256) = 1024

EIP712_DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,uint256 chainId,address verifyingContract)"
)
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("Permit2")
TOKEN_PERMISSIONS_TYPEHASH: constant(bytes32) = keccak256(
    "TokenPermissions(address token,uint256 amount)"
)
PERMIT_TRANSFER_FROM_TYPEHASH: constant(bytes32) = keccak256(
    "PermitTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline)TokenPermissions(address token,uint256 amount)"
)
# The witness type hash is keccak256(stub ++ witnessTypeString); the caller's string completes
# the primary type ("<Type> witness)") and appends the referenced types in EIP-712 order.
PERMIT_WITNESS_TRANSFER_FROM_TYPEHASH_STUB: constant(String[100]) = "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"

SECP256K1_N: constant(uint256) = 115792089237316195423570985008687907852837564279074904382605163141518161494337
SECP256K1N_HALF: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168
ERC1271_MAGIC: constant(bytes4) = 0x1626ba7e


@view
@external
def DOMAIN_SEPARATOR() -> bytes32:
    return self._domain_separator()


@view
@internal
def _domain_separator() -> bytes32:
    # Per call, from chain.id and self: valid wherever the runtime code is placed.
    return keccak256(abi_encode(EIP712_DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, chain.id, self))


@external
def permitWitnessTransferFrom(
    permit: PermitTransferFrom,
    transferDetails: SignatureTransferDetails,
    owner: address,
    witness: bytes32,
    witnessTypeString: String[MAX_WITNESS_TYPE_STRING],
    signature: Bytes[65],
):
    """
    @notice Move transferDetails.requestedAmount (at most permit.permitted.amount) of
            permit.permitted.token from `owner` to transferDetails.to, on the owner's
            signature over PermitWitnessTransferFrom(permitted, spender = msg.sender, nonce,
            deadline, witness). `witness` is the hash of the witness struct and
            `witnessTypeString` the rest of the type string after the stub
            "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256
            nonce,uint256 deadline,".
    """
    type_hash: bytes32 = keccak256(
        concat(PERMIT_WITNESS_TRANSFER_FROM_TYPEHASH_STUB, witnessTypeString))
    struct_hash: bytes32 = keccak256(abi_encode(
        type_hash, self._hash_token_permissions(permit.permitted), msg.sender, permit.nonce,
        permit.deadline, witness))
    self._permit_transfer_from(permit, transferDetails, owner, struct_hash, signature)


@external
def permitTransferFrom(
    permit: PermitTransferFrom,
    transferDetails: SignatureTransferDetails,
    owner: address,
    signature: Bytes[65],
):
    """
    @notice As permitWitnessTransferFrom, without a witness (PermitTransferFrom).
    """
    struct_hash: bytes32 = keccak256(abi_encode(
        PERMIT_TRANSFER_FROM_TYPEHASH, self._hash_token_permissions(permit.permitted),
        msg.sender, permit.nonce, permit.deadline))
    self._permit_transfer_from(permit, transferDetails, owner, struct_hash, signature)


@external
def invalidateUnorderedNonces(wordPos: uint256, mask: uint256):
    """
    @notice Spend every nonce of the caller whose bit is set in `mask` within word `wordPos`
            (nonces wordPos * 256 + bit): signed permits using them can no longer be used.
    """
    self.nonceBitmap[msg.sender][wordPos] |= mask
    log UnorderedNonceInvalidation(owner=msg.sender, word=wordPos, mask=mask)


@pure
@internal
def _hash_token_permissions(permitted: TokenPermissions) -> bytes32:
    return keccak256(abi_encode(TOKEN_PERMISSIONS_TYPEHASH, permitted.token, permitted.amount))


@internal
def _permit_transfer_from(
    permit: PermitTransferFrom,
    transferDetails: SignatureTransferDetails,
    owner: address,
    struct_hash: bytes32,
    signature: Bytes[65],
):
    assert block.timestamp <= permit.deadline, "SignatureExpired"
    assert transferDetails.requestedAmount <= permit.permitted.amount, "InvalidAmount"
    self._use_unordered_nonce(owner, permit.nonce)
    digest: bytes32 = keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))
    self._verify(signature, digest, owner)
    assert extcall IERC20(permit.permitted.token).transferFrom(
        owner, transferDetails.to, transferDetails.requestedAmount, default_return_value=True
    ), "TRANSFER_FROM_FAILED"


@internal
def _use_unordered_nonce(owner: address, nonce: uint256):
    word_pos: uint256 = nonce >> 8
    bit: uint256 = 1 << (nonce & 255)
    flipped: uint256 = self.nonceBitmap[owner][word_pos] ^ bit
    assert flipped & bit != 0, "InvalidNonce"
    self.nonceBitmap[owner][word_pos] = flipped


@view
@internal
def _verify(signature: Bytes[65], digest: bytes32, owner: address):
    # Permit2's SignatureVerification: an owner with code answers by ERC-1271, an EOA by ECDSA.
    if owner.is_contract:
        magic: bytes4 = staticcall IERC1271(owner).isValidSignature(digest, signature)
        assert magic == ERC1271_MAGIC, "InvalidContractSignature"
        return
    assert len(signature) == 65, "InvalidSignatureLength"
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    assert v == 27 or v == 28, "InvalidSignature"
    assert r != 0 and r < SECP256K1_N and s != 0 and s <= SECP256K1N_HALF, "InvalidSignature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address) and signer == owner, "InvalidSignature"
