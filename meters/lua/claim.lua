-- Claim a deposit record: create it with all its fields unless it exists. Atomic.
-- KEYS[1] deposit:<key> (one key: on a cluster the set of open deposits lives elsewhere, and
-- the caller lists the deposit there first; see meters/deposits.py)
-- ARGV[1..] field, value, field, value, ...
-- Returns 1 if claimed now, 0 if the record already existed.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
