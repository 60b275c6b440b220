-- Charge what a reservation has delivered so far, then reserve more for it. Atomic.
-- KEYS[1] acct:{<account>}   KEYS[2] res:{<account>}:<rid>   KEYS[3] held:{<account>}:<owner>
-- (the reservations the owner holds on the account)   KEYS[4] fenced:{<account>} (owners a
-- sweeper declared dead and swept here)   One slot: the account's hash tag.
-- ARGV[1] reservation id   ARGV[2] owner   ARGV[3] account id
-- ARGV[4] charged_target: the reservation's cumulative charge after this call (idempotent:
--         only the difference to what is already charged moves from held to spent)
-- ARGV[5] want: atomic units to add to the hold   ARGV[6] min: fewest acceptable (else none)
-- Returns {status, taken, balance_after, charged}; status 1 = ok, 0 = could not reserve min,
-- -1 = no such account, -2 = reservation gone (swept: the owner was presumed dead; or
-- already settled; or the owner was declared dead and swept here).
-- The caller listed the account in the owner's index first (Ledger._index), so a sweeper finds
-- whatever this creates.
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
if balance == nil then return {-1, 0, 0, 0} end
local target, want, min = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
-- A dead owner's late call (sent before it knew) must not hold money the sweeper already
-- walked past: every account it swept fences the owner.
if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 1 then return {-2, 0, balance, 0} end
local exists = redis.call('EXISTS', KEYS[2]) == 1
local held, charged = 0, 0
if exists then
  if redis.call('HEXISTS', KEYS[2], 'swept') == 1 then return {-2, 0, balance, 0} end
  held = tonumber(redis.call('HGET', KEYS[2], 'held'))
  charged = tonumber(redis.call('HGET', KEYS[2], 'charged'))
  local previous = redis.call('HGET', KEYS[2], 'owner')
  if previous and previous ~= ARGV[2] then
    -- The process took a new owner id (its old one was declared dead) and re-checks a hold
    -- not swept yet: it moves to the new owner's set, out of reach of the old one's sweep.
    -- The old set's key is this one's with the other owner: same hash tag, same slot.
    redis.call('SREM', string.sub(KEYS[3], 1, #KEYS[3] - #ARGV[2]) .. previous, ARGV[1])
  end
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
end
return {status, take, balance, charged}
