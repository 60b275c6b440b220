-- Final charge of a reservation and return of what it still holds. Atomic, idempotent.
-- KEYS[1] acct:{<account>}   KEYS[2] res:{<account>}:<rid>   KEYS[3] held:{<account>}:<owner>
-- (the caller's owner; the reservation's own owner's set is derived from it)
-- KEYS[4] usage:{<account>} (the account's queue of Stripe usage records)
-- One slot: the account's hash tag.
-- ARGV[1] reservation id   ARGV[2] charged_target: the request's total charge
-- ARGV[3] "1" to queue usage, or ""   ARGV[4] tokens billed   ARGV[5] unix time: when usage is
--   queued, the account has a stripe_customer and tokens were billed, one usage record
--   {identifier = the reservation id, customer, value, timestamp} is queued on KEYS[4] with
--   the charge (once: a replayed settle queues nothing), for the Stripe meter events sender.
-- Returns {status, charged_total, returned, shortfall, balance_after, queued}; status 1 =
-- settled now, 0 = nothing to settle (the reservation is gone: this settle already ran), -1 =
-- no account; queued 1 when a usage record was queued (the caller indexes the account).
--
-- Idempotence: a settle deletes its reservation, and a reservation only comes into being
-- through lease.lua holding money (or sweep.lua marking it swept, a record kept for a day), so
-- a settle that finds no reservation is a replay of one that already ran (e.g. retried by the
-- keeper after a reply was lost): it moves nothing. No record per request is left behind.
--
-- The reservation's charge is brought to exactly the target:
-- * above what was charged while streaming (upstream usage reported above what was metered):
--   the difference comes from the hold, then the balance, never below zero; what cannot be
--   taken is the shortfall, recorded on the account for the operator;
-- * below it (an estimate that over-counted, reconciled to reported usage): the difference
--   is refunded to the balance.
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
if balance == nil then return {-1, 0, 0, 0, 0, 0} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {0, 0, 0, 0, balance, 0}
end
-- The reservation may belong to an earlier owner id of this process (see lease.lua): its set
-- is this one's with that owner (same hash tag, same slot).
local owner = redis.call('HGET', KEYS[2], 'owner')
local owner_now = string.match(KEYS[3], '[^:]*$')
local owner_set = KEYS[3]
if owner and owner ~= owner_now then
  owner_set = string.sub(KEYS[3], 1, #KEYS[3] - #owner_now) .. owner
end
local target = tonumber(ARGV[2])
local held = tonumber(redis.call('HGET', KEYS[2], 'held'))
local charged = tonumber(redis.call('HGET', KEYS[2], 'charged'))
local due = target - charged
local refund = 0
if due < 0 then
  refund = -due
  due = 0
end
local from_hold = due
if from_hold > held then from_hold = held end
local from_balance = due - from_hold
if from_balance > balance then from_balance = balance end
local shortfall = due - from_hold - from_balance
local returned = held - from_hold
redis.call('HINCRBY', KEYS[1], 'held', -held)
balance = redis.call('HINCRBY', KEYS[1], 'balance', returned + refund - from_balance)
redis.call('HINCRBY', KEYS[1], 'spent', from_hold + from_balance - refund)
if shortfall > 0 then redis.call('HINCRBY', KEYS[1], 'shortfall', shortfall) end
redis.call('DEL', KEYS[2])
redis.call('SREM', owner_set, ARGV[1])
local queued = 0
if ARGV[3] == '1' and tonumber(ARGV[4]) > 0 then
  local customer = redis.call('HGET', KEYS[1], 'stripe_customer')
  if customer then
    redis.call('RPUSH', KEYS[4], cjson.encode({identifier = ARGV[1], customer = customer,
                                               value = tonumber(ARGV[4]),
                                               timestamp = tonumber(ARGV[5])}))
    queued = 1
  end
end
return {1, charged - refund + from_hold + from_balance, returned, shortfall, balance, queued}
