-- Accept a cumulative voucher on a channel, crediting what it adds to the channel's account.
-- Atomic: vouchers on one channel are serialised by Redis, whatever process takes them.
-- KEYS[1] chan:{mpp_<id>}   KEYS[2] chan:{mpp_<id>}:vouchers (score = cumulative amount)
-- KEYS[3] acct:{mpp_<id>} (the channel's ledger account)   One slot: the account's hash tag.
-- ARGV[1] cumulative amount   ARGV[2] signature   ARGV[3] minVoucherDelta
-- ARGV[4] the channel credits are announced on   ARGV[5] the channel's account id
-- Returns {status, acceptedCumulative}: 1 = accepted now, 0 = not above the accepted amount
-- (an idempotent replay: nothing changes), -1 = below minVoucherDelta, -2 = above the
-- deposit, -3 = a close is pending, -4 = unknown channel, -5 = channel finalized.
local accepted = tonumber(redis.call('HGET', KEYS[1], 'accepted'))
if accepted == nil then return {-4, 0} end
if redis.call('HGET', KEYS[1], 'finalized') == '1' then return {-5, accepted} end
if redis.call('HGET', KEYS[1], 'close_requested') ~= '0' then return {-3, accepted} end
local cumulative = tonumber(ARGV[1])
if cumulative <= accepted then return {0, accepted} end
if cumulative - accepted < tonumber(ARGV[3]) then return {-1, accepted} end
if cumulative > tonumber(redis.call('HGET', KEYS[1], 'deposit')) then return {-2, accepted} end
local delta = cumulative - accepted
redis.call('HINCRBY', KEYS[3], 'balance', delta)
redis.call('HINCRBY', KEYS[3], 'credited', delta)
redis.call('HSET', KEYS[1], 'accepted', cumulative)
redis.call('ZADD', KEYS[2], cumulative, ARGV[1] .. ':' .. ARGV[2])
-- Wakes the streams paused for a voucher, in every process (meters/notices.py).
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {1, cumulative}
