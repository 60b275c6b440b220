-- Credit an account exactly once per idempotency key. Atomic.
-- KEYS[1] acct:{<account>}   KEYS[2] idem:{<account>}:<purpose>:<key> (idem:{<account>} when
-- there is none: never touched then)   One slot: the account's hash tag.
-- ARGV[1] amount   ARGV[2] 1 if KEYS[2] is a real idempotency key   ARGV[3] idempotency TTL (s)
-- ARGV[4] the most an account may ever be credited (MAX_AMOUNT: sums stay exact in Lua)
-- ARGV[5] the channel credits are announced on   ARGV[6] the account id (the message)
-- Returns {status, balance}; status 1 = credited, 0 = already credited with this key (same
-- amount), -1 = no such account, -2 = key already used with a different amount, -3 = the
-- credit would take the account past the maximum (nothing written, the key included).
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local amount = tonumber(ARGV[1])
if ARGV[2] == '1' then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    if tonumber(prior) == amount then
      return {0, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
    end
    return {-2, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
  end
end
local credited = tonumber(redis.call('HGET', KEYS[1], 'credited') or '0')
if credited + amount > tonumber(ARGV[4]) then
  return {-3, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], amount, 'EX', tonumber(ARGV[3]))
end
redis.call('HINCRBY', KEYS[1], 'credited', amount)
local balance = redis.call('HINCRBY', KEYS[1], 'balance', amount)
-- Wakes the streams paused on this account, in every process (meters/notices.py).
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {1, balance}
