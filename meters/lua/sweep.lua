-- Return the holds of every owner (gateway process) whose heartbeat key has expired.
-- KEYS[1] set of owners   ARGV[1] key prefix
-- Returns {reservations_returned, atomic_units_returned}.
-- Keys are built here from the prefix: tollstream runs against one Redis, not a cluster.
local p = ARGV[1]
local count, total = 0, 0
for _, owner in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', p .. 'alive:' .. owner) == 0 then
    local set = p .. 'owner:' .. owner
    for _, rid in ipairs(redis.call('SMEMBERS', set)) do
      local res = p .. 'res:' .. rid
      local account = redis.call('HGET', res, 'account')
      local held = tonumber(redis.call('HGET', res, 'held') or '0')
      if account and held > 0 then
        local acct = p .. 'acct:' .. account
        redis.call('HINCRBY', acct, 'held', -held)
        redis.call('HINCRBY', acct, 'balance', held)
        total = total + held
      end
      -- Keep the reservation's record of what it already charged (a late settle by a process
      -- that was only stalled must not charge it twice), marked swept, for a day.
      redis.call('HSET', res, 'held', 0, 'swept', 1)
      redis.call('EXPIRE', res, 86400)
      count = count + 1
    end
    redis.call('DEL', set)
    redis.call('SREM', KEYS[1], owner)
  end
end
return {count, total}
