-- Return the holds of owners (gateway processes) whose heartbeat key has expired, at most
-- ARGV[2] reservations per call: a crashed process may have left any number of holds, and a
-- script blocks Redis while it runs, so the caller (Ledger.sweep) calls again while this
-- returns more = 1. Each reservation is returned atomically, so a sweep cut into batches is
-- as safe as one: a process that beats again between two batches keeps the holds not yet
-- swept, and its meters re-check theirs (lease.lua refuses a swept reservation).
-- KEYS[1] set of owners   ARGV[1] key prefix   ARGV[2] most reservations to return
-- Returns {reservations_returned, atomic_units_returned, more}.
-- Keys are built here from the prefix: tollstream runs against one Redis, not a cluster.
local p = ARGV[1]
local budget = tonumber(ARGV[2])
local count, total, more = 0, 0, 0
for _, owner in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', p .. 'alive:' .. owner) == 0 then
    if budget <= count then
      more = 1
      break
    end
    local set = p .. 'owner:' .. owner
    -- SPOP removes what it returns: two processes sweeping the same owner never return a
    -- hold twice, and an emptied set is deleted by Redis.
    for _, rid in ipairs(redis.call('SPOP', set, budget - count)) do
      local res = p .. 'res:' .. rid
      local account = redis.call('HGET', res, 'account')
      local held = tonumber(redis.call('HGET', res, 'held') or '0')
      if account and held > 0 then
        local acct = p .. 'acct:' .. account
        redis.call('HINCRBY', acct, 'held', -held)
        redis.call('HINCRBY', acct, 'balance', held)
        total = total + held
      end
      if redis.call('EXISTS', res) == 1 then
        -- Keep the reservation's record of what it already charged (a late settle by a
        -- process that was only stalled must not charge it twice), marked swept, for a day.
        redis.call('HSET', res, 'held', 0, 'swept', 1)
        redis.call('EXPIRE', res, 86400)
      end
      count = count + 1
    end
    if redis.call('EXISTS', set) == 1 then
      more = 1
      break
    end
    redis.call('SREM', KEYS[1], owner)
  end
end
return {count, total, more}
