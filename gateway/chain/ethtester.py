"""The dev chain's eth-tester backend: py-evm in this process behind a JSON-RPC HTTP server.

Used by :mod:`gateway.chain.devchain` when anvil is not installed. It answers like anvil where
settlement depends on it: reverts carry ``Error(string)`` data, refused transactions use
geth's wording, blocks follow a clock that ``evm_setTime`` moves, and an empty block is mined
(lazily) when the head is a block time behind that clock. ``anvil_setCode`` and
``anvil_setBalance`` change an account's state in a new (empty) block, as the dev chain needs
to place Permit2 and the x402 upto proxy at their canonical addresses.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from web3 import Web3


def _to_json_rpc(value: Any) -> Any:
    """Render eth-tester's Python values as JSON-RPC: quantities and bytes as 0x-hex."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _to_json_rpc(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json_rpc(v) for v in value]
    return str(value)


_NONCE_ERROR = re.compile(r"Invalid transaction nonce: Expected (\d+), but got (\d+)")


def _revert_error(exc: Exception) -> dict[str, Any]:
    """JSON-RPC error for an exception raised by eth-tester, shaped like anvil's: reverts carry
    Error(string) data, refused transactions geth's wording (code -32003)."""
    reason = exc.args[0] if exc.args else str(exc)
    if isinstance(reason, bytes | bytearray):
        data = "0x" + bytes(reason).hex()
        return {"code": 3, "message": "execution reverted", "data": data}
    message = str(reason)
    if type(exc).__name__ == "TransactionFailed":
        from eth_abi import encode

        # Error(string) so web3 decodes the reason as it would from a real node.
        reason_text = message.removeprefix("execution reverted: ")
        data = "0x08c379a0" + encode(["string"], [reason_text]).hex()
        return {"code": 3, "message": f"execution reverted: {reason_text}", "data": data}
    nonce = _NONCE_ERROR.search(message)
    if nonce:
        expected, got = int(nonce.group(1)), int(nonce.group(2))
        wording = "nonce too low" if got < expected else "nonce too high"
        return {"code": -32003, "message": f"{wording}: {message}"}
    if "cannot afford txn gas" in message:
        return {"code": -32003, "message": f"insufficient funds for gas * price + value: "
                                           f"{message}"}
    return {"code": -32000, "message": message}


# Methods that mine the pending block (automine), and methods that look at the head block.
_MINING = frozenset({"eth_sendRawTransaction", "eth_sendTransaction", "evm_mine"})
_HEAD_READS = frozenset({"eth_call", "eth_estimateGas", "eth_blockNumber", "eth_getBlockByNumber"})


class TesterRpc:
    """eth-tester behind web3's request formatting; one lock because py-evm is not thread-safe.

    The chain follows a clock (the wall clock, shifted by ``evm_setTime`` as on anvil) as
    anvil with ``--mixed-mining`` does. py-evm alone stamps the pending block when the
    *previous* block is mined, so after an idle minute a transaction would be mined (and
    simulated by eth_call) a minute in the past. Here every mined block carries the clock's
    time, an empty block is mined when the head is ``block_time`` or more behind the clock as
    soon as anyone looks at the head (interval mining, done lazily), and the "pending" tag
    (unsupported by eth-tester) means a head at the clock's time.
    """

    def __init__(self, *, chain_id: int, block_time: float | None = 1.0) -> None:
        from eth.chains.base import ChainContext
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider

        backend = PyEVMBackend()
        # eth-tester hard-codes its chain id; CHAINID (and so the EIP-712 domain) reads these.
        backend.chain.chain_id = chain_id
        backend.chain.chain_context = ChainContext(chain_id)
        self.chain_id = chain_id
        self.backend = backend
        self.tester = EthereumTester(backend)
        provider = EthereumTesterProvider(self.tester)
        self.w3 = Web3(provider)
        self._request = provider.request_func(self.w3, self.w3.middleware_onion)
        self._lock = threading.Lock()
        self.block_time = block_time
        self._offset = 0.0  # chain clock - wall clock, set by evm_setTime

    def now(self) -> int:
        """The chain clock."""
        return int(time.time() + self._offset)

    def _follow_clock(self, method: str, params: list[Any]) -> list[Any]:
        """Keep blocks on the clock before ``method`` runs; returns its params ("pending"
        rewritten to "latest" once the head is at the clock's time). Under the lock."""
        chain = self.backend.chain
        head = chain.get_canonical_head().timestamp
        now = self.now()
        pending = method in ("eth_call", "eth_estimateGas") and "pending" in params[1:]
        if method in _MINING or pending or (
                method in _HEAD_READS and self.block_time is not None
                and now - head >= self.block_time):
            chain.header = chain.header.copy(timestamp=max(now, head + 1))
            if method not in _MINING and now > head:
                self.tester.mine_blocks(1)  # an empty block at the clock's time
        if pending:
            params = [params[0], "latest", *params[2:]]
        return params

    def _set_account(self, method: str, params: list[Any]) -> None:
        """``anvil_setCode(address, code)`` / ``anvil_setBalance(address, wei)``: change the
        pending block's state and mine it, so "latest" sees the change at once (as on anvil).
        Under the lock."""
        from eth_utils import to_canonical_address, to_int

        address = to_canonical_address(params[0])
        self._follow_clock("evm_mine", [])  # the block to be mined carries the clock's time
        chain = self.backend.chain
        vm = chain.get_vm(chain.header)
        if method == "anvil_setCode":
            vm.state.set_code(address, bytes.fromhex(str(params[1]).removeprefix("0x")))
        else:
            value = params[1]
            vm.state.set_balance(address, to_int(hexstr=value) if isinstance(value, str)
                                 else int(value))
        vm.state.persist()
        chain.header = chain.header.copy(state_root=vm.state.state_root)
        self.tester.mine_blocks(1)

    def handle(self, req: Any) -> Any:
        if isinstance(req, list):
            return [self.handle(item) for item in req]
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            return {"jsonrpc": "2.0", "id": None,
                    "error": {"code": -32600, "message": "invalid request"}}
        rid = req.get("id")
        method: str = req["method"]
        params = req.get("params") or []
        if method == "eth_chainId":
            return {"jsonrpc": "2.0", "id": rid, "result": hex(self.chain_id)}
        if method == "net_version":
            return {"jsonrpc": "2.0", "id": rid, "result": str(self.chain_id)}
        try:
            with self._lock:
                if method == "evm_setTime":  # as anvil: returns the jump in seconds
                    before = self.now()
                    self._offset = int(params[0]) - time.time()
                    return {"jsonrpc": "2.0", "id": rid, "result": self.now() - before}
                if method in ("anvil_setCode", "anvil_setBalance"):
                    self._set_account(method, list(params))
                    return {"jsonrpc": "2.0", "id": rid, "result": None}
                params = self._follow_clock(method, list(params))
                resp = self._request(method, params)
        except Exception as exc:  # any eth-tester failure is a JSON-RPC error to the caller
            return {"jsonrpc": "2.0", "id": rid, "error": _revert_error(exc)}
        out: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
        if "error" in resp:
            err = resp["error"]
            out["error"] = err if isinstance(err, dict) else {"code": -32000, "message": str(err)}
        else:
            out["result"] = _to_json_rpc(resp.get("result"))
        return out


def start_tester(port: int | None, *, chain_id: int, fund: str, block_time: float | None
                 ) -> tuple[str, Callable[[], None]]:
    """Serve a fresh eth-tester chain on 127.0.0.1 (``port`` or a free one); give ``fund`` (the
    relayer) 1,000 ETH. Returns the URL and a function that stops the server."""
    rpc = TesterRpc(chain_id=chain_id, block_time=block_time)
    # From eth-tester's pre-funded, unlocked account, through handle() like every request, so
    # the block follows the chain's clock.
    funded = rpc.handle({"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction", "params": [
        {"from": rpc.w3.eth.accounts[0], "to": fund, "value": hex(1_000 * 10**18)}]})
    if "error" in funded:
        raise RuntimeError(f"eth-tester: funding the relayer failed: {funded['error']}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                req = json.loads(self.rfile.read(length))
            except ValueError:
                result: Any = {"jsonrpc": "2.0", "id": None,
                               "error": {"code": -32700, "message": "parse error"}}
            else:
                result = rpc.handle(req)
            body = json.dumps(result).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests and the CLI print JSON on stdout

    server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="devchain-rpc", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return url, stop


__all__ = ["TesterRpc", "start_tester"]
