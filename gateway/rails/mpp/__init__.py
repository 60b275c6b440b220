"""The Machine Payments Protocol (MPP) rail, method ``evm``.

* :mod:`~gateway.rails.mpp.scheme`: the ``Payment`` HTTP authentication scheme's wire format
  (challenges, credentials, receipts, problem details);
* :mod:`~gateway.rails.mpp.rail`: the rail the routes talk to (one 402 offer per intent,
  credentials checked against their challenge and dispatched by intent);
* :mod:`~gateway.rails.mpp.charge`: the one-time ``charge`` intent (EIP-3009);
* :mod:`~gateway.rails.mpp.channel`, :mod:`~gateway.rails.mpp.escrow`,
  :mod:`~gateway.rails.mpp.outcomes`: the ``session`` intent's payment channel
  (``draft-evm-session-00``): its state, id, vouchers and deposit authorizations; the escrow
  contract (``gateway/chain/Escrow.vy``); what its reverts and events mean.
"""
