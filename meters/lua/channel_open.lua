-- Record an opened channel and its ledger account, once. Atomic.
-- KEYS[1] chan:{mpp_<id>}   KEYS[2] acct:{mpp_<id>} (its ledger account)   One slot: the
-- account's hash tag. The caller listed the channel in the set of open channels first.
-- ARGV[1] channel id   ARGV[2..] field, value pairs of the channel
-- Returns 1 if recorded now, 0 if the channel was already known (a retried open).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'accepted', 0, 'settled', 0, 'close_requested', 0,
           'finalized', 0, unpack(ARGV, 2))
for _, field in ipairs({'balance', 'held', 'spent', 'credited', 'shortfall'}) do
  redis.call('HSETNX', KEYS[2], field, 0)
end
redis.call('HSETNX', KEYS[2], 'label', 'mpp channel ' .. ARGV[1])
return 1
