"""TestUSDC artifact, dev chain start-up, and the token's EIP-3009 behaviour on-chain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eth_account import Account
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError

from gateway.chain import build
from gateway.chain.anvil import find_anvil
from gateway.chain.devchain import CHAIN_ID, DevChain, start_chain
from gateway.rails.evm import EvmNetwork
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, make_auth

REPO = Path(__file__).resolve().parents[1]


def test_artifact_matches_fresh_compile() -> None:
    artifact = build.load_artifact()
    assert artifact["sourceSha256"] == build.source_sha256()
    assert not build.is_stale(), "run: python -m gateway.chain.build"
    assert artifact["vyperVersion"].startswith("0.4.3")
    names = {item.get("name") for item in artifact["abi"]}
    assert {"transferWithAuthorization", "receiveWithAuthorization", "authorizationState",
            "DOMAIN_SEPARATOR", "mint", "AuthorizationUsed", "Transfer"} <= names
    escrow = build.load_artifact(build.ESCROW_ARTIFACT)
    assert escrow["sourceSha256"] == build.source_sha256(build.ESCROW_SOURCE)
    assert build.stale_contracts() == []
    assert {"open", "openWithAuthorization", "topUp", "topUpWithAuthorization", "settle",
            "close", "requestClose", "withdraw", "getChannel", "computeChannelId",
            "ChannelOpened", "Settled", "TopUp", "CloseRequested", "CloseRequestCancelled",
            "ChannelClosed", "CLOSE_GRACE_PERIOD"} <= {item.get("name") for item in escrow["abi"]}


def test_build_check_covers_every_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "TestUSDC.json is up to date" in out and "Escrow.json is up to date" in out
    with pytest.raises(ValueError, match="unknown contract"):
        build.paths("Nope")


def test_build_check_fails_on_a_stale_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    source, artifact = build.paths("Escrow")
    (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / artifact.name).write_bytes(artifact.read_bytes())
    monkeypatch.setattr(build, "HERE", tmp_path)
    monkeypatch.setattr(build, "CONTRACTS", ("Escrow",))  # one contract: fewer compiles
    source, _ = build.paths("Escrow")
    source.write_text(source.read_text() + "\n# changed\n")
    assert build.main(["--check"]) == 1
    assert "Escrow.json is stale" in capsys.readouterr().err
    assert build.main([]) == 0
    assert build.main(["--check"]) == 0


def _w3(chain: DevChain) -> Web3:
    return Web3(HTTPProvider(chain.rpc_url, request_kwargs={"timeout": 10}))


def _token(chain: DevChain) -> object:
    return _w3(chain).eth.contract(address=Web3.to_checksum_address(chain.token),
                                   abi=build.load_artifact()["abi"])


def test_chain_started_and_funded(chain: DevChain) -> None:
    w3 = _w3(chain)
    assert w3.eth.chain_id == CHAIN_ID == chain.chain_id
    token = _token(chain)
    assert token.functions.decimals().call() == 6  # type: ignore[attr-defined]
    assert token.functions.name().call() == chain.token_name  # type: ignore[attr-defined]
    for wallet in chain.wallets:
        assert token.functions.balanceOf(wallet.address).call() >= 0  # type: ignore[attr-defined]
        assert w3.eth.get_balance(wallet.address) == 0  # payers need no ETH
    assert w3.eth.get_balance(chain.relayer_address) > 10**18
    info = json.loads(chain.to_json())
    assert info["token"] == chain.token and len(info["wallets"]) == len(chain.wallets)
    assert info["escrow"] == chain.escrow and info["escrow_grace_period"] == 900
    assert len(w3.eth.get_code(Web3.to_checksum_address(chain.escrow))) > 0
    assert info["network"] == "eip155:31337"


def _send_twa(chain: DevChain, auth_args: tuple[object, ...]) -> dict[str, object]:
    w3 = _w3(chain)
    relayer = Account.from_key(chain.relayer_key)
    fn = _token(chain).functions.transferWithAuthorization(*auth_args)  # type: ignore[attr-defined]
    tx = fn.build_transaction({"from": relayer.address, "gas": 200_000,
                               "nonce": w3.eth.get_transaction_count(relayer.address, "pending"),
                               "chainId": CHAIN_ID, "gasPrice": w3.eth.gas_price * 2})
    signed = relayer.sign_transaction(tx)
    return dict(w3.eth.wait_for_transaction_receipt(
        w3.eth.send_raw_transaction(signed.raw_transaction), timeout=30))


def test_direct_transfer_with_authorization_and_replay(chain: DevChain,
                                                       evm_network: EvmNetwork) -> None:
    wallet = chain.wallets[0]
    token = _token(chain)
    auth = make_auth(evm_network, wallet.private_key, value=4_321)
    v, r, s = auth.vrs()
    args = (wallet.address, PAY_TO, auth.value, auth.valid_after, auth.valid_before,
            bytes.fromhex(auth.nonce[2:]), v, r, s)
    before = token.functions.balanceOf(wallet.address).call()  # type: ignore[attr-defined]
    receipt = _send_twa(chain, args)
    assert receipt["status"] == 1
    assert token.functions.balanceOf(wallet.address).call() == before - 4_321  # type: ignore[attr-defined]
    assert token.functions.authorizationState(  # type: ignore[attr-defined]
        wallet.address, bytes.fromhex(auth.nonce[2:])).call()
    # Replay: simulation reverts with FiatToken's message, and a mined replay fails.
    call = token.functions.transferWithAuthorization(*args)  # type: ignore[attr-defined]
    with pytest.raises(ContractLogicError, match="authorization is used or canceled"):
        call.call({"from": chain.relayer_address})
    assert _send_twa(chain, args)["status"] == 0
    # Wrong signer and expiry revert with the USDC strings.
    forged = (chain.wallets[1].address, *args[1:])
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        token.functions.transferWithAuthorization(*forged).call(  # type: ignore[attr-defined]
            {"from": chain.relayer_address})
    now = int(time.time())
    expired = make_auth(evm_network, wallet.private_key, valid_after=0, valid_before=now - 10)
    v, r, s = expired.vrs()
    with pytest.raises(ContractLogicError, match="authorization is expired"):
        token.functions.transferWithAuthorization(  # type: ignore[attr-defined]
            wallet.address, PAY_TO, expired.value, 0, expired.valid_before,
            bytes.fromhex(expired.nonce[2:]), v, r, s).call({"from": chain.relayer_address})
    if chain.backend == "anvil":  # eth-tester refuses eth_call from accounts without ETH
        with pytest.raises(ContractLogicError, match="caller is not a minter"):
            token.functions.mint(wallet.address, 1).call(  # type: ignore[attr-defined]
                {"from": wallet.address})


def test_token_fallback_only_takes_the_bytes_receive_overload(chain: DevChain) -> None:
    """Vyper has no overloads: TestUSDC's __default__ serves USDC v2.2's
    receiveWithAuthorization(..., bytes signature) and refuses every other unknown call."""
    w3 = _w3(chain)
    call = {"from": chain.relayer_address, "to": chain.token}
    with pytest.raises(ContractLogicError, match="unknown function"):
        w3.eth.call({**call, "data": "0x12345678"})  # type: ignore[typeddict-item]
    selector = Web3.keccak(text="receiveWithAuthorization(address,address,uint256,uint256,"
                                "uint256,bytes32,bytes)")[:4].hex()
    with pytest.raises(ContractLogicError, match="invalid signature"):
        w3.eth.call({**call, "data": "0x" + selector + "00" * 64})  # type: ignore[typeddict-item]


def test_domain_separator_matches_eip712(chain: DevChain, evm_network: EvmNetwork) -> None:
    from eth_account.messages import encode_typed_data

    from gateway.rails.evm import typed_data

    auth = make_auth(evm_network, chain.wallets[0].private_key)
    signable = encode_typed_data(full_message=typed_data(auth, evm_network))
    assert _token(chain).functions.DOMAIN_SEPARATOR().call() == signable.header  # type: ignore[attr-defined]


def test_eth_tester_fallback_backend() -> None:
    with start_chain(wallets=1, funding=5_000_000, backend="eth-tester") as fallback:
        assert fallback.backend == "eth-tester"
        w3 = _w3(fallback)
        assert w3.eth.chain_id == CHAIN_ID
        assert _token(fallback).functions.balanceOf(  # type: ignore[attr-defined]
            fallback.wallets[0].address).call() == 5_000_000


@pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (npm install)")
def test_anvil_is_used_when_installed(chain: DevChain) -> None:
    if os.environ.get("TOLLSTREAM_CHAIN_BACKEND", "auto") == "auto":
        assert chain.backend == "anvil"


def test_chain_cli_prints_json_and_stops_on_sigterm() -> None:
    code = "from gateway.chain.devchain import run_chain_cli; run_chain_cli(2, None)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        info = json.loads(line)
        assert info["chain_id"] == CHAIN_ID and len(info["wallets"]) == 2
        assert info["escrow"].startswith("0x") and info["escrow"] != info["token"]
        assert _w3_url(info["rpc_url"]).eth.chain_id == CHAIN_ID
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _w3_url(url: str) -> Web3:
    return Web3(HTTPProvider(url, request_kwargs={"timeout": 10}))
