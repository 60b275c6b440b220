-- Claim a deposit record: create it with all its fields unless it exists. Atomic.
-- KEYS[1] deposit record hash   KEYS[2] set of open deposits
-- ARGV[1] deposit key (member of KEYS[2])   ARGV[2..] field, value, field, value, ...
-- Returns 1 if claimed now, 0 if the record already existed.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
