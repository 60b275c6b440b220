-- Return the holds a dead owner (gateway process) left on one account, at most ARGV[2]
-- reservations per call: a crashed process may have left any number of holds, and a script
-- blocks Redis while it runs, so the caller (Ledger.sweep) calls again while this returns
-- more = 1, then moves on to the owner's next account. Each reservation is returned
-- atomically with taking it out of the owner's set (SPOP), so two sweepers never return a
-- hold twice, and a sweep cut into batches is as safe as one.
-- The caller declared the owner dead first (dead:{<owner>}, atomically with seeing its
-- heartbeat expired): it never beats again under that id, so nothing here needs its
-- heartbeat, which lives in another slot. Its late calls are fenced off here (KEYS[3]):
-- lease.lua refuses an owner the account fences, so no hold of it appears after this ran.
-- KEYS[1] acct:{<account>}   KEYS[2] held:{<account>}:<owner>   KEYS[3] fenced:{<account>}
-- ARGV[1] owner   ARGV[2] most reservations to return   ARGV[3] the account's reservation
-- key prefix, res:{<account>}: (a reservation's key is it plus its id: same hash tag, same
-- slot as KEYS)   ARGV[4] how long the fence is kept (s)
-- Returns {reservations_returned, atomic_units_returned, more}.
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[4])
local count, total = 0, 0
for _, rid in ipairs(redis.call('SPOP', KEYS[2], tonumber(ARGV[2]))) do
  local res = ARGV[3] .. rid
  local held = tonumber(redis.call('HGET', res, 'held') or '0')
  if held > 0 then
    redis.call('HINCRBY', KEYS[1], 'held', -held)
    redis.call('HINCRBY', KEYS[1], 'balance', held)
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
return {count, total, redis.call('EXISTS', KEYS[2])}
