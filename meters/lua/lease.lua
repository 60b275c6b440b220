-- Charge what a reservation has delivered so far, then reserve more for it. Atomic.
-- KEYS[1] account hash   KEYS[2] reservation hash   KEYS[3] owner's reservation set
-- KEYS[4] set of owners
-- ARGV[1] reservation id   ARGV[2] owner   ARGV[3] account id
-- ARGV[4] charged_target: the reservation's cumulative charge after this call (idempotent:
--         only the difference to what is already charged moves from held to spent)
-- ARGV[5] want: atomic units to add to the hold   ARGV[6] min: fewest acceptable (else none)
-- Returns {status, taken, balance_after, charged}; status 1 = ok, 0 = could not reserve min,
-- -1 = no such account, -2 = reservation gone (swept: the owner was presumed dead; or
-- already settled).
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
if balance == nil then return {-1, 0, 0, 0} end
local target, want, min = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local exists = redis.call('EXISTS', KEYS[2]) == 1
local held, charged = 0, 0
if exists then
  if redis.call('HEXISTS', KEYS[2], 'swept') == 1 then return {-2, 0, balance, 0} end
  held = tonumber(redis.call('HGET', KEYS[2], 'held'))
  charged = tonumber(redis.call('HGET', KEYS[2], 'charged'))
elseif target > 0 then
  return {-2, 0, balance, 0}
end
-- Hold first, then charge: a charge may need the money this call adds to the hold (the
-- prompt re-priced up from the upstream's report, before any output was granted).
local take = want
if balance < take then take = balance end
local status = 1
if take < min then
  take = 0
  status = 0
end
if take > 0 then
  balance = balance - take
  held = held + take
  redis.call('HINCRBY', KEYS[1], 'balance', -take)
  redis.call('HINCRBY', KEYS[1], 'held', take)
end
if target > charged then
  local due = target - charged
  -- Delivered tokens are paid from the hold; the hold always covers them because the meter
  -- never grants a token outside it.
  if due > held then due = held end
  held = held - due
  charged = charged + due
  redis.call('HINCRBY', KEYS[1], 'held', -due)
  redis.call('HINCRBY', KEYS[1], 'spent', due)
end
if exists or take > 0 then
  redis.call('HSET', KEYS[2], 'account', ARGV[3], 'owner', ARGV[2], 'held', held,
             'charged', charged)
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('SADD', KEYS[4], ARGV[2])
end
return {status, take, balance, charged}
