-- Begin, abort or finish a channel's cooperative close. Atomic with the streams' leases.
-- KEYS[1] chan:{mpp_<id>}   KEYS[2] acct:{mpp_<id>} (its ledger account)   One slot: the
-- account's hash tag. After finish the caller takes the channel out of the open set.
-- ARGV[1] "begin" | "abort" | "finish"   ARGV[2] channel id   ARGV[3] settled (finish)
-- begin: refuses (-1) while a stream holds money on the channel; else takes the unspent
--   accepted amount out of the account (credited and balance: nothing is left to stream on,
--   the escrow refunds it to the payer) and marks the close pending. Returns the amount.
-- abort: the close failed on-chain: puts the amount back, clears the mark. Returns it.
-- finish: the channel is finalized on-chain (closed by us, or withdrawn by the payer after a
--   forced close): any unspent amount still on the account leaves it too. Returns 1.
local mode = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if mode == 'begin' then
  if redis.call('HGET', KEYS[1], 'finalized') == '1' then return -3 end
  if tonumber(redis.call('HGET', KEYS[2], 'held') or '0') > 0 then return -1 end
  local left = tonumber(redis.call('HGET', KEYS[2], 'balance') or '0')
  redis.call('HINCRBY', KEYS[2], 'balance', -left)
  redis.call('HINCRBY', KEYS[2], 'credited', -left)
  redis.call('HSET', KEYS[1], 'close_requested', 1, 'close_refund', left)
  return left
elseif mode == 'abort' then
  local left = tonumber(redis.call('HGET', KEYS[1], 'close_refund') or '0')
  redis.call('HINCRBY', KEYS[2], 'balance', left)
  redis.call('HINCRBY', KEYS[2], 'credited', left)
  redis.call('HSET', KEYS[1], 'close_requested', 0, 'close_refund', 0)
  return left
end
local left = tonumber(redis.call('HGET', KEYS[2], 'balance') or '0')
redis.call('HINCRBY', KEYS[2], 'balance', -left)
redis.call('HINCRBY', KEYS[2], 'credited', -left)
redis.call('HSET', KEYS[1], 'finalized', 1, 'settled', ARGV[3], 'close_requested', 1)
return 1
