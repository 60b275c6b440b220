# pragma version 0.4.3
"""
@title TestUSDC
@notice Minimal ERC-20 with EIP-3009 (transferWithAuthorization) for local test chains.
        Mirrors the parts of Circle's FiatTokenV2 that x402's `exact` scheme and the MPP
        session escrow use, including its revert strings, so settlement code can be tested
        against it. Test token only: no blacklist, no pause, owner mints freely.
"""

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

event AuthorizationUsed:
    authorizer: indexed(address)
    nonce: indexed(bytes32)

event AuthorizationCanceled:
    authorizer: indexed(address)
    nonce: indexed(bytes32)

name: public(String[64])
symbol: public(String[32])
version: public(String[16])
decimals: public(constant(uint8)) = 6
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
owner: public(address)

_authorization_states: HashMap[address, HashMap[bytes32, bool]]

EIP712_DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
RECEIVE_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
CANCEL_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "CancelAuthorization(address authorizer,bytes32 nonce)"
)

# USDC v2.2's `bytes signature` overload of receiveWithAuthorization, which the MPP session
# escrow calls (draft-evm-session-00, "openWithAuthorization": tokens with only the v/r/s form
# are not supported). Vyper has no overloading, so __default__ dispatches it by selector.
RECEIVE_WITH_AUTHORIZATION_BYTES: constant(bytes4) = method_id(
    "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
    output_type=bytes4,
)
# 4-byte selector + 7 head words + the bytes' length word + 65 bytes padded to 96: the only
# encoding accepted (a 65-byte signature from an EOA; no ERC-1271 payers on this test token).
RECEIVE_WITH_AUTHORIZATION_BYTES_CALLDATA: constant(uint256) = 4 + 7 * 32 + 32 + 96

# secp256k1n / 2: signatures with a larger s are malleable and rejected (as OpenZeppelin's ECDSA).
SECP256K1N_HALF: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168


@deploy
def __init__(_name: String[64], _version: String[16]):
    self.name = _name
    self.symbol = "USDC"
    self.version = _version
    self.owner = msg.sender


@view
@external
def DOMAIN_SEPARATOR() -> bytes32:
    return self._domain_separator()


@view
@internal
def _domain_separator() -> bytes32:
    # Computed per call so the separator follows chain.id (forks) like FiatTokenV2.
    return keccak256(abi_encode(
        EIP712_DOMAIN_TYPEHASH,
        keccak256(convert(self.name, Bytes[64])),
        keccak256(convert(self.version, Bytes[16])),
        chain.id,
        self,
    ))


@internal
def _transfer(sender: address, receiver: address, amount: uint256):
    assert receiver != empty(address), "ERC20: transfer to the zero address"
    assert self.balanceOf[sender] >= amount, "ERC20: transfer amount exceeds balance"
    self.balanceOf[sender] -= amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=sender, receiver=receiver, value=amount)


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    assert self.allowance[sender][msg.sender] >= amount, "ERC20: transfer amount exceeds allowance"
    self.allowance[sender][msg.sender] -= amount
    self._transfer(sender, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def mint(to: address, amount: uint256):
    assert msg.sender == self.owner, "FiatToken: caller is not a minter"
    assert to != empty(address), "FiatToken: mint to the zero address"
    self.totalSupply += amount
    self.balanceOf[to] += amount
    log Transfer(sender=empty(address), receiver=to, value=amount)


@view
@external
def authorizationState(authorizer: address, nonce: bytes32) -> bool:
    return self._authorization_states[authorizer][nonce]


@view
@internal
def _recover(digest: bytes32, v: uint8, r: bytes32, s: bytes32) -> address:
    assert convert(s, uint256) <= SECP256K1N_HALF, "FiatTokenV2: invalid signature"
    assert v == 27 or v == 28, "FiatTokenV2: invalid signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "FiatTokenV2: invalid signature"
    return signer


@internal
def _use_authorization(
    typehash: bytes32,
    _from: address,
    _to: address,
    _value: uint256,
    valid_after: uint256,
    valid_before: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    assert block.timestamp > valid_after, "FiatTokenV2: authorization is not yet valid"
    assert block.timestamp < valid_before, "FiatTokenV2: authorization is expired"
    assert not self._authorization_states[_from][nonce], "FiatTokenV2: authorization is used or canceled"
    struct_hash: bytes32 = keccak256(abi_encode(
        typehash, _from, _to, _value, valid_after, valid_before, nonce
    ))
    digest: bytes32 = keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))
    assert self._recover(digest, v, r, s) == _from, "FiatTokenV2: invalid signature"
    self._authorization_states[_from][nonce] = True
    log AuthorizationUsed(authorizer=_from, nonce=nonce)


@external
def transferWithAuthorization(
    _from: address,
    _to: address,
    _value: uint256,
    validAfter: uint256,
    validBefore: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    self._use_authorization(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH, _from, _to, _value, validAfter, validBefore,
        nonce, v, r, s,
    )
    self._transfer(_from, _to, _value)


@external
def receiveWithAuthorization(
    _from: address,
    _to: address,
    _value: uint256,
    validAfter: uint256,
    validBefore: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    # Only the payee may submit, so a front-runner cannot redirect the call's side effects.
    assert _to == msg.sender, "FiatTokenV2: caller must be the payee"
    self._use_authorization(
        RECEIVE_WITH_AUTHORIZATION_TYPEHASH, _from, _to, _value, validAfter, validBefore,
        nonce, v, r, s,
    )
    self._transfer(_from, _to, _value)


@external
def __default__():
    """
    @notice receiveWithAuthorization(from, to, value, validAfter, validBefore, nonce,
            bytes signature): the packed r || s || v overload (USDC v2.2). Every other
            selector reverts, as on a contract without a fallback.
    """
    assert len(msg.data) >= 4, "TestUSDC: unknown function"
    assert convert(slice(msg.data, 0, 4), bytes4) == RECEIVE_WITH_AUTHORIZATION_BYTES, \
        "TestUSDC: unknown function"
    assert len(msg.data) == RECEIVE_WITH_AUTHORIZATION_BYTES_CALLDATA, \
        "FiatTokenV2: invalid signature"
    _from: address = empty(address)
    _to: address = empty(address)
    _value: uint256 = 0
    valid_after: uint256 = 0
    valid_before: uint256 = 0
    nonce: bytes32 = empty(bytes32)
    signature: Bytes[65] = b""
    _from, _to, _value, valid_after, valid_before, nonce, signature = abi_decode(
        slice(msg.data, 4, RECEIVE_WITH_AUTHORIZATION_BYTES_CALLDATA - 4),
        (address, address, uint256, uint256, uint256, bytes32, Bytes[65]),
    )
    assert len(signature) == 65, "FiatTokenV2: invalid signature"
    assert _to == msg.sender, "FiatTokenV2: caller must be the payee"
    self._use_authorization(
        RECEIVE_WITH_AUTHORIZATION_TYPEHASH, _from, _to, _value, valid_after, valid_before,
        nonce, convert(slice(signature, 64, 1), uint8), extract32(signature, 0),
        extract32(signature, 32),
    )
    self._transfer(_from, _to, _value)


@external
def cancelAuthorization(authorizer: address, nonce: bytes32, v: uint8, r: bytes32, s: bytes32):
    assert not self._authorization_states[authorizer][nonce], "FiatTokenV2: authorization is used or canceled"
    struct_hash: bytes32 = keccak256(abi_encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce))
    digest: bytes32 = keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))
    assert self._recover(digest, v, r, s) == authorizer, "FiatTokenV2: invalid signature"
    self._authorization_states[authorizer][nonce] = True
    log AuthorizationCanceled(authorizer=authorizer, nonce=nonce)
