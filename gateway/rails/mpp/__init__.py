"""The Machine Payments Protocol (MPP) rails: the ``Payment`` HTTP authentication scheme
(:mod:`scheme`), the ``evm`` charge (:mod:`charge`) and the ``evm`` session on an escrow
channel (:mod:`channel`, :mod:`session`)."""
