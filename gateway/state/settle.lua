-- Settle one request, atomically: give back its lease, then charge its tokens to every
-- quota scope (with a marker, only once per response id).
-- KEYS: marker, then per scope (4 each): token bucket, day counter, month counter, leases
-- ARGV: now, tokens, use marker (0|1), marker ttl, day ttl, month ttl, scope count,
--       lease id ('' for none), then per scope: tpm
-- Returns 1 if tokens were charged, else 0.
local now = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local n = tonumber(ARGV[7])
local lease = ARGV[8]
if lease ~= '' then
  for i = 0, n - 1 do
    redis.call('ZREM', KEYS[2 + i * 4 + 3], lease)
  end
end
if tokens <= 0 then return 0 end
if ARGV[3] == '1' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4]) then return 0 end
end
for i = 0, n - 1 do
  local k = 1 + i * 4
  local tpm = tonumber(ARGV[9 + i])
  if tpm > 0 then
    local v = redis.call('HMGET', KEYS[k + 1], 'l', 't')
    local l, t = tonumber(v[1]), tonumber(v[2])
    if l == nil then l = tpm else l = math.min(tpm, l + math.max(0, now - t) * tpm / 60) end
    l = l - tokens
    redis.call('HSET', KEYS[k + 1], 'l', tostring(l), 't', tostring(now))
    redis.call('PEXPIRE', KEYS[k + 1], math.ceil((tpm - l) * 60000 / tpm) + 1000)
  end
  redis.call('INCRBY', KEYS[k + 2], tokens)
  redis.call('EXPIRE', KEYS[k + 2], math.ceil(tonumber(ARGV[5])) + 3600)
  redis.call('INCRBY', KEYS[k + 3], tokens)
  redis.call('EXPIRE', KEYS[k + 3], math.ceil(tonumber(ARGV[6])) + 3600)
end
return 1
