-- Final charge of a reservation and return of what it still holds. Atomic, idempotent.
-- KEYS[1] account hash   KEYS[2] reservation hash   KEYS[3] owner's reservation set
-- ARGV[1] reservation id   ARGV[2] charged_target: the request's total charge
-- Returns {charged_total, returned, shortfall}.
-- The reservation's charge is brought to exactly the target:
-- * above what was charged while streaming (upstream usage reported above what was metered):
--   the difference comes from the hold, then the balance, never below zero; what cannot be
--   taken is the shortfall, recorded on the account for the operator;
-- * below it (an estimate that over-counted, reconciled to reported usage): the difference
--   is refunded to the balance.
local target = tonumber(ARGV[2])
local held, charged = 0, 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  held = tonumber(redis.call('HGET', KEYS[2], 'held'))
  charged = tonumber(redis.call('HGET', KEYS[2], 'charged'))
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
if balance == nil then return {0, 0, 0} end
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
redis.call('HINCRBY', KEYS[1], 'balance', returned + refund - from_balance)
redis.call('HINCRBY', KEYS[1], 'spent', from_hold + from_balance - refund)
if shortfall > 0 then redis.call('HINCRBY', KEYS[1], 'shortfall', shortfall) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return {charged - refund + from_hold + from_balance, returned, shortfall}
