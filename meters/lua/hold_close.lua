-- Begin or finish closing a pre-authorized hold (a manual-capture payment). Atomic with the
-- streams' leases on the account it funds.
-- KEYS[1] <kind>:{<account>} (the hold funding the account)   KEYS[2] acct:{<account>}
-- One slot: the account's hash tag. After finish the caller takes the hold out of the set of
-- open holds (another slot).
-- ARGV[1] "begin" | "finish"   ARGV[2] hold id   ARGV[3] final state (finish: captured|canceled)
-- begin: the amount to capture. A hold already closing answers its recorded amount again (a
--   retried close captures the same). -1: a stream holds money on the account (close when it
--   has ended); -2: no such hold, or it is closed already. Otherwise the account stops being
--   spendable: its unspent balance leaves it (credited and balance; the payment method is
--   charged only what was spent) and the amount to capture is everything the account spent.
-- finish: records the final state. Returns 1.
-- freeze: the account stops funding new leases (its unheld balance leaves it) while a stream
--   still spends the lease it holds: that stream is cut when its lease runs out. Returns 1 (0
--   if the hold is not open). An authorization nearing its deadline is frozen this way.
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[1] == 'freeze' then
  if state ~= 'open' then return 0 end
  local unheld = tonumber(redis.call('HGET', KEYS[2], 'balance') or '0')
  redis.call('HINCRBY', KEYS[2], 'balance', -unheld)
  redis.call('HINCRBY', KEYS[2], 'credited', -unheld)
  return 1
end
if ARGV[1] == 'finish' then
  redis.call('HSET', KEYS[1], 'state', ARGV[3])
  return 1
end
if state == 'closing' then return tonumber(redis.call('HGET', KEYS[1], 'capture')) end
if state ~= 'open' then return -2 end
if tonumber(redis.call('HGET', KEYS[2], 'held') or '0') > 0 then return -1 end
local left = tonumber(redis.call('HGET', KEYS[2], 'balance') or '0')
redis.call('HINCRBY', KEYS[2], 'balance', -left)
redis.call('HINCRBY', KEYS[2], 'credited', -left)
local spent = tonumber(redis.call('HGET', KEYS[2], 'spent') or '0')
redis.call('HSET', KEYS[1], 'state', 'closing', 'capture', spent)
return spent
